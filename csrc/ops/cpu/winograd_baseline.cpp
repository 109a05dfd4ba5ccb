// The Winograd F(4x4, 3x3) transforms built for the compiler's baseline ISA (SSE2 on x86-64; any other processor).
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "winograd_cpu.h"

#define UNET_CPU_ISA baseline
#define UNET_CPU_LANES 4  // floats per vector
#include "winograd_kernel.h"
#undef UNET_CPU_ISA
#undef UNET_CPU_LANES
