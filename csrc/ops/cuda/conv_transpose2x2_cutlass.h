// The CUTLASS tensor-core path of conv_transpose2x2 (conv_transpose2x2_cutlass.cu), built only
// when setup.py finds the nvidia-cutlass headers (UNET_EXT_WITH_CUTLASS): float16/bfloat16, and
// float as TF32 when torch.backends.cudnn.allow_tf32; channel counts multiples of 8 (4 for
// float); channels_last results. Each returns an undefined tensor when the problem is outside
// the fast path (the caller then takes the generic kernels). Launches on the current stream.
#pragma once

#include <ATen/core/Tensor.h>

#include "../conv2d_relu.h"

namespace unet_ext {
namespace conv {

// out (N, C_out, 2H, 2W), channels_last = conv_transpose2d(input, weight, bias, stride 2).
at::Tensor conv_transpose2x2_forward_cutlass(const ConvGeometry& g, const at::Tensor& input,
                                             const at::Tensor& weight, const at::Tensor& bias);

// grad_input (channels_last) from grad_out.
at::Tensor conv_transpose2x2_dgrad_cutlass(const ConvGeometry& g, const at::Tensor& grad_out,
                                           const at::Tensor& weight);

// grad_weight (C_in, C_out, 2, 2) in weight's dtype, summed in a fixed order (serial split-K).
at::Tensor conv_transpose2x2_wgrad_cutlass(const ConvGeometry& g, const at::Tensor& grad_out,
                                           const at::Tensor& input, at::ScalarType weight_dtype);

}  // namespace conv
}  // namespace unet_ext
