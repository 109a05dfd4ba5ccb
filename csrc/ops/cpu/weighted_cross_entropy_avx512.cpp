// weighted_cross_entropy CPU kernels built for AVX-512 (F, BW, VL, DQ).
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

#if defined(__x86_64__) || defined(__i386__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi,bmi2,f16c")
#define UNET_CPU_ISA avx512
#define UNET_CPU_VECTOR_FLOOR 1  // roundps (SSE4.1) is part of these targets
#include "vec_math.h"
#include "weighted_cross_entropy_kernel.h"
#pragma GCC pop_options
#else  // other processors: the baseline build serves
namespace unet_ext::wce::avx512 {
void forward(const Prepared&, ForwardOutputs&) { TORCH_CHECK(false, "avx512 kernels need x86"); }
void backward(const Prepared&, const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&) {
  TORCH_CHECK(false, "avx512 kernels need x86");
}
}  // namespace unet_ext::wce::avx512
#endif
