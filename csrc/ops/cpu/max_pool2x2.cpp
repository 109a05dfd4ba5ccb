// max_pool2x2 on the CPU. One pass over the input at memory speed: NCHW reads the two input
// rows of an output row (the pairwise maxima vectorise over the row), channels_last takes the
// four pixels' channel vectors. The backward recomputes each window's argmax from the input
// (max_pool2x2.h's rule, as stock PyTorch picks) and writes every element of grad_input once:
// the gradient there, zeros elsewhere (an odd last row or column gets zeros).
// bfloat16 is read and written as its raw bits (Elem below): a shift widens them to float for the
// comparisons and narrows the maximum back exactly, so the loops vectorise like float32's.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "../common/dispatch.h"
#include "../max_pool2x2_host.h"
#include "cpu_isa.h"

#define UNET_CPU_ISA baseline
#include "max_pool2x2_kernel.h"
#undef UNET_CPU_ISA

#if defined(__x86_64__) || defined(__i386__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi,bmi2,f16c")
#define UNET_CPU_ISA avx512
#include "max_pool2x2_kernel.h"
#undef UNET_CPU_ISA
#pragma GCC pop_options
#endif

namespace unet_ext {
namespace max_pool {
namespace {

// The AVX-512 build where it is faster (medians at 2x32x312x312 / 2x64x152x152, fwd + bwd):
// channels_last in every dtype (bf16 0.56 + 0.92 -> 0.23 + 0.41 ms, float32 0.68 + 1.18 ->
// 0.26 + 0.78 ms), NCHW float32 (1.48 + 2.32 -> 0.96 + 1.93 ms). NCHW bf16 stays on the baseline
// build: its pairwise rows vectorised worse there (0.39 + 0.57 -> 0.89 + 1.0 ms at 64x152x152).
bool use_avx512(const Geometry& g, at::ScalarType dtype) {
#if defined(__x86_64__) || defined(__i386__)
  return cpu::best_isa() == cpu::Isa::kAvx512 && (g.channels_last || dtype != at::kBFloat16);
#else
  return false;
#endif
}

at::Tensor max_pool2x2_cpu(const at::Tensor& input_arg) {
  at::Tensor input = input_arg, out;
  const Geometry g = forward_geometry(input, out);
  if (out.numel() == 0) return out;
  UNET_DISPATCH_FLOATING_TYPES(input.scalar_type(), "max_pool2x2_cpu", [&] {
    using T = baseline::storage_t<scalar_t>;
    const T* in = static_cast<const T*>(input.const_data_ptr());
    T* dst = static_cast<T*>(out.mutable_data_ptr());
    if (use_avx512(g, input.scalar_type())) {
      g.channels_last ? avx512::forward_nhwc<scalar_t>(g, in, dst) : avx512::forward_nchw<scalar_t>(g, in, dst);
    } else {
      g.channels_last ? baseline::forward_nhwc<scalar_t>(g, in, dst) : baseline::forward_nchw<scalar_t>(g, in, dst);
    }
  });
  return out;
}

at::Tensor max_pool2x2_backward_cpu(const at::Tensor& grad_out_arg, const at::Tensor& input_arg) {
  at::Tensor grad_out = grad_out_arg, input = input_arg, grad_input;
  const Geometry g = backward_geometry(grad_out, input, grad_input);
  if (grad_input.numel() == 0) return grad_input;
  UNET_DISPATCH_FLOATING_TYPES(input.scalar_type(), "max_pool2x2_backward_cpu", [&] {
    using T = baseline::storage_t<scalar_t>;
    const T* go = static_cast<const T*>(grad_out.const_data_ptr());
    const T* in = static_cast<const T*>(input.const_data_ptr());
    T* gi = static_cast<T*>(grad_input.mutable_data_ptr());
    if (use_avx512(g, input.scalar_type())) {
      g.channels_last ? avx512::backward_nhwc<scalar_t>(g, go, in, gi) : avx512::backward_nchw<scalar_t>(g, go, in, gi);
    } else {
      g.channels_last ? baseline::backward_nhwc<scalar_t>(g, go, in, gi) : baseline::backward_nchw<scalar_t>(g, go, in, gi);
    }
  });
  return grad_input;
}

}  // namespace
}  // namespace max_pool
}  // namespace unet_ext

TORCH_LIBRARY_IMPL(unet_ext, CPU, m) {
  m.impl("max_pool2x2", &unet_ext::max_pool::max_pool2x2_cpu);
  m.impl("_max_pool2x2_backward", &unet_ext::max_pool::max_pool2x2_backward_cpu);
}
