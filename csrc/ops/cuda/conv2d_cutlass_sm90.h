// The Hopper (sm_90a wgmma + TMA) path of conv2d_relu / conv2d_bias, dgrad and wgrad, float16 and
// bfloat16 (conv2d_cutlass_sm90.cu). Present when the build's arch list names 9.0a and the
// nvidia-cutlass headers are found; the callers try it first and fall back to conv2d_cutlass.h.
#pragma once

#include <ATen/core/Tensor.h>

#include "conv2d_cutlass.h"

namespace unet_ext {
namespace conv {

// Whether this build has the sm_90a kernels (`unet-ext info` and the tests report it).
bool conv2d_sm90_built();

// As conv2d_forward_cutlass / conv2d_dgrad_cutlass, but only on an sm_90 device and for 16-bit
// floats; an undefined tensor otherwise (nothing launched).
at::Tensor conv2d_forward_sm90(const ConvGeometry& g, const at::Tensor& input, const at::Tensor& weight,
                               const at::Tensor& bias, bool relu);
at::Tensor conv2d_dgrad_sm90(const ConvGeometry& g, const at::Tensor& grad, const at::Tensor& weight);
// As conv2d_wgrad_cutlass, and only where the GEMM has >= 128 output tiles (the deep layers);
// deterministic (one CTA reduces each tile over all pixels in a fixed order).
at::Tensor conv2d_wgrad_sm90(const ConvGeometry& g, const at::Tensor& grad, const at::Tensor& input);

}  // namespace conv
}  // namespace unet_ext
