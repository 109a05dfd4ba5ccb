// The Hopper (sm_90a wgmma + TMA) path of conv2d_relu / conv2d_bias, dgrad and wgrad, float16 and
// bfloat16 (conv2d_cutlass_sm90.cu dispatches, conv2d_cutlass_sm90_<op>_<dtype>.cu hold the
// kernels). Present when the build's arch list names 9.0a; conv2d_cutlass.cu tries it first and
// falls back to its sm_80 kernels. Operands packed (NHWC / KRSC) and 16-byte aligned; outputs are
// the caller's (a batch slice of a bigger channels_last tensor is fine). Each returns false when
// the problem is not for it (nothing launched).
#pragma once

#include <ATen/core/Tensor.h>

#include "../conv2d_relu.h"

namespace unet_ext {
namespace conv {

// output = [relu](conv(x, w) + b), only on an sm_90 device, for 16-bit floats, padding <= k - 1.
bool conv2d_forward_sm90(const ConvGeometry& g, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                         bool relu, const at::Tensor& output);
bool conv2d_dgrad_sm90(const ConvGeometry& g, const at::Tensor& dy, const at::Tensor& w, const at::Tensor& dx);
// dw (fp32 KRSC) over all of g's pixels, only where the GEMM has >= 128 output tiles (the deep
// layers); deterministic (one CTA reduces each tile over all pixels in a fixed order).
bool conv2d_wgrad_sm90(const ConvGeometry& g, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& dw);

}  // namespace conv
}  // namespace unet_ext
