// Run-time choice of the instruction set for the CPU kernels that are built per ISA
// (AVX-512, AVX2+FMA, baseline), and the declarations of those per-ISA entry points.
#pragma once

#include <ATen/core/Tensor.h>

#include "../weighted_cross_entropy_host.h"

namespace unet_ext {
namespace cpu {

enum class Isa { kBaseline, kAvx2, kAvx512 };

// UNET_EXT_CPU_ISA=baseline|avx2|avx512 caps the choice (for tests and comparisons).
Isa best_isa();
const char* isa_name(Isa isa);

// Whether the CPU multiplies bfloat16 pairs into float32 in hardware (AVX512-BF16, AMX): then
// oneDNN's bf16 convolutions run at about twice its float32 rate (conv2d_kernel.h, use_onednn).
bool has_bf16_dot_products();

}  // namespace cpu

namespace wce {
#define UNET_DECLARE_WCE_CPU_KERNELS(ISA)                                                        \
  namespace ISA {                                                                              \
  void forward(const Prepared& p, ForwardOutputs& out);                                        \
  void backward(const Prepared& p, const at::Tensor& grad_loss, const at::Tensor& logsumexp,   \
                const at::Tensor& total_weight, at::Tensor& grad_logits);                      \
  }
UNET_DECLARE_WCE_CPU_KERNELS(baseline)
UNET_DECLARE_WCE_CPU_KERNELS(avx2)
UNET_DECLARE_WCE_CPU_KERNELS(avx512)
#undef UNET_DECLARE_WCE_CPU_KERNELS
}  // namespace wce
}  // namespace unet_ext
