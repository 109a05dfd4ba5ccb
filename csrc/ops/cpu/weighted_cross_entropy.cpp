// weighted_cross_entropy on the CPU: entry points and registration. The kernels
// (weighted_cross_entropy_kernel.h) are built for AVX-512, AVX2 and the baseline ISA; the best
// one this processor supports is picked at run time (cpu_isa.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../weighted_cross_entropy_host.h"
#include "cpu_isa.h"

namespace unet_ext {
namespace wce {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight_map,
    const std::optional<at::Tensor>& class_weight, int64_t ignore_index, c10::string_view reduction,
    bool opmath_loss) {
  Prepared p = prepare("unet_ext.weighted_cross_entropy", logits, target, weight_map, class_weight,
                       ignore_index, reduction);
  ForwardOutputs out = allocate_forward(p);
  switch (cpu::best_isa()) {
    case cpu::Isa::kAvx512: avx512::forward(p, out); break;
    case cpu::Isa::kAvx2: avx2::forward(p, out); break;
    default: baseline::forward(p, out);
  }
  return finish_forward(p, out, opmath_loss);
}

at::Tensor backward_cpu(const at::Tensor& grad_loss, const at::Tensor& logits,
                        const at::Tensor& target, const std::optional<at::Tensor>& weight_map,
                        const std::optional<at::Tensor>& class_weight, const at::Tensor& logsumexp,
                        const at::Tensor& total_weight, int64_t ignore_index,
                        c10::string_view reduction) {
  Prepared p = prepare("unet_ext._weighted_cross_entropy_backward", logits, target, weight_map,
                       class_weight, ignore_index, reduction);
  at::Tensor grad = grad_loss;  // in opmath dtype after prepare_backward
  at::Tensor grad_logits = prepare_backward(p, grad, logsumexp, total_weight);
  if (grad_logits.numel() == 0) return grad_logits;
  switch (cpu::best_isa()) {
    case cpu::Isa::kAvx512: avx512::backward(p, grad, logsumexp, total_weight, grad_logits); break;
    case cpu::Isa::kAvx2: avx2::backward(p, grad, logsumexp, total_weight, grad_logits); break;
    default: baseline::backward(p, grad, logsumexp, total_weight, grad_logits);
  }
  return grad_logits;
}

}  // namespace
}  // namespace wce
}  // namespace unet_ext

TORCH_LIBRARY_IMPL(unet_ext, CPU, m) {
  m.impl("_weighted_cross_entropy_forward", &unet_ext::wce::forward_cpu);
  m.impl("_weighted_cross_entropy_backward", &unet_ext::wce::backward_cpu);
}
