// weighted_cross_entropy CPU kernels built for the compiler's baseline ISA (SSE2 on x86-64; any other processor).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <vector>

#include "../common/dispatch.h"
#include "../weighted_cross_entropy_host.h"
#include "cpu_isa.h"

#define UNET_CPU_ISA baseline
#define UNET_CPU_VECTOR_FLOOR 0
#include "vec_math.h"
#include "weighted_cross_entropy_kernel.h"
