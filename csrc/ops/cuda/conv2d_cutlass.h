// The CUTLASS tensor-core path of conv2d_relu / conv2d_bias and their dgrad (conv2d_cutlass.cu), built only
// when setup.py finds the nvidia-cutlass headers (it then defines UNET_EXT_WITH_CUTLASS).
// float16/bfloat16 (C_in and C_out multiples of 8) and float as TF32 when
// torch.backends.cudnn.allow_tf32 is set (multiples of 4); NHWC in and out, fp32 accumulation.
#pragma once

#include <ATen/core/Tensor.h>

#include "../conv2d_relu.h"

namespace unet_ext {
namespace conv {

// Whether the CUTLASS kernels take this problem: 16-bit float (or float with TF32 allowed),
// 128-bit aligned channel rows, int sizes, sm_80+.
bool conv2d_cutlass_fits(const ConvGeometry& g, at::ScalarType dtype);

// Whether the entry points below take it: as conv2d_cutlass_fits, except that channel counts need
// no alignment (they are padded with zero channels: the first layer's 1 or 3, the head's 2).
bool conv2d_cutlass_takes(const ConvGeometry& g, at::ScalarType dtype);

// The channels_last output [relu](conv(input, weight) + bias), or an undefined tensor when the
// problem is outside the fast path (dtype, alignment, 32-bit sizes); the caller then falls back.
// bias may be undefined. Launches on the current stream of the current (guarded) device.
at::Tensor conv2d_forward_cutlass(const ConvGeometry& g, const at::Tensor& input,
                                  const at::Tensor& weight, const at::Tensor& bias, bool relu);

// grad_input (channels_last) = the dgrad convolution of `grad` (grad_out with the ReLU mask
// already applied, N x C_out x H_out x W_out) with weight, or undefined outside the fast path.
at::Tensor conv2d_dgrad_cutlass(const ConvGeometry& g, const at::Tensor& grad, const at::Tensor& weight);

// grad_weight as fp32 (C_out, C_in, kh, kw) in channels_last memory (KRSC) = sum over pixels of
// `grad` (masked) x input, deterministic (serial split-K), or undefined outside the fast path.
at::Tensor conv2d_wgrad_cutlass(const ConvGeometry& g, const at::Tensor& grad, const at::Tensor& input);

}  // namespace conv
}  // namespace unet_ext
