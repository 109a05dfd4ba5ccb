// The CPU conv wgrad with NaN or inf in its input. weight_gradients (conv2d_kernel.h) runs its GEMMs
// over "wide" rows: the kernel_w - 1 columns past each output row, whose gradient is zero, read the
// input's border (and the next row's first pixels). 0 * NaN = NaN, so a non-finite pixel at an
// image border leaks into taps that stock PyTorch leaves finite. A finite result cannot have been
// touched (0 * finite = 0), so only a non-finite one is recomputed the stock way: this costs one
// check of the weight-sized result per backward, and stock's wgrad only where stock gives NaN too.
#pragma once

#include <ATen/ATen.h>

namespace unet_ext {
namespace conv {

// grad_weight_acc (opmath dtype) as computed, or stock's weight gradient for the same inputs:
// mask (ReLU's output, or undefined for no ReLU) applied to grad_out as threshold_backward does.
inline at::Tensor wgrad_matching_stock(const at::Tensor& grad_weight_acc, const at::Tensor& grad_out,
                                       const at::Tensor& input, const at::Tensor& weight,
                                       const at::Tensor& mask, int64_t padding) {
  if (grad_weight_acc.numel() == 0 || at::isfinite(grad_weight_acc).all().item<bool>()) return grad_weight_acc;
  const at::Tensor grad = mask.defined() ? at::threshold_backward(grad_out, mask, 0) : grad_out;
  const at::Tensor stock = std::get<1>(at::convolution_backward(
      grad, input, weight, std::nullopt, {1, 1}, {padding, padding}, {1, 1}, false, {0, 0}, 1,
      {false, true, false}));
  return stock.to(grad_weight_acc.scalar_type()).contiguous();
}

}  // namespace conv
}  // namespace unet_ext
