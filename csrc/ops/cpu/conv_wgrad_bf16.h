// The bf16 weight gradient of a channels_last convolution on AVX512-BF16 (conv_wgrad_bf16.cpp):
// float32 sums of bf16 products (vdpbf16ps), rounded to bf16 once at the end.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <utility>
#include <vector>

#include "../conv2d_relu.h"

namespace unet_ext {
namespace conv {

// One run of input channels: a bf16 channels_last tensor (channel stride 1) read from row `top`,
// column `left` on (a crop window; 0, 0 for a whole tensor). The parts' channels follow one
// another: conv2d_relu_concat passes the skip's window, then up.
struct Bf16WgradPart {
  at::Tensor tensor;
  int64_t top = 0, left = 0;
};

// Whether bf16_weight_gradient takes this convolution here: a CPU with AVX512-BF16 (and the
// AVX-512 kernels not capped by UNET_EXT_CPU_ISA), kernel_w * in_channels a multiple of 16 (the
// micro-kernel's column vectors; any output channel count, kernel height, padding).
// UNET_EXT_BF16_WGRAD=0 (read per call) leaves the weight gradient to oneDNN.
bool use_bf16_wgrad(const ConvGeometry& g);

// The weight gradient (bf16, channels_last) and bias gradient (bf16) of g, as output_mask[1], [2]
// ask (empty tensors otherwise). grad: the (ReLU-masked) output gradient, bf16 channels_last
// [N, C_out, H_out, W_out]; parts: the input's channels, as above.
std::pair<at::Tensor, at::Tensor> bf16_weight_gradient(const ConvGeometry& g, const at::Tensor& grad,
                                                       const std::vector<Bf16WgradPart>& parts,
                                                       const at::Tensor& weight, std::array<bool, 3> output_mask);

}  // namespace conv
}  // namespace unet_ext
