// The Hopper conv runners (conv2d_cutlass_sm90_kernels.cuh), declared without the CUTLASS 3 headers:
// conv2d_cutlass_sm90.cu dispatches to them, and one conv2d_cutlass_sm90_<op>_<dtype>.cu file
// instantiates each. Operands packed (NHWC / KRSC), 16-byte aligned; the output is the caller's.
// False when CUTLASS declines the problem (nothing launched).
#pragma once

#include <ATen/core/Tensor.h>

#include "../conv2d_relu.h"
#include "cutlass/bfloat16.h"
#include "cutlass/half.h"

namespace unet_ext {
namespace conv {
namespace sm90 {

// output (NHWC) = [relu](conv(x, w) + b); b may be undefined (zeros). kNarrow: 128x64 output
// tiles (for C_out <= 64), else 128x128.
template <typename element_t, bool kRelu, bool kNarrow>
bool fprop(const ConvGeometry& g, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
           const at::Tensor& output);
// dx (NHWC) = the dgrad of the (masked) gradient dy with w.
template <typename element_t>
bool dgrad(const ConvGeometry& g, const at::Tensor& dy, const at::Tensor& w, const at::Tensor& dx);
// dw (fp32, KRSC) = dy^T x over all pixels, one CTA per output tile (deterministic).
template <typename element_t>
bool wgrad(const ConvGeometry& g, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& dw);

#define UNET_EXT_SM90_FPROP(element_t, relu, narrow)                                                     \
  template bool fprop<element_t, relu, narrow>(const ConvGeometry&, const at::Tensor&, const at::Tensor&,  \
                                               const at::Tensor&, const at::Tensor&)
#define UNET_EXT_SM90_DGRAD(element_t) \
  template bool dgrad<element_t>(const ConvGeometry&, const at::Tensor&, const at::Tensor&, const at::Tensor&)
#define UNET_EXT_SM90_WGRAD(element_t) \
  template bool wgrad<element_t>(const ConvGeometry&, const at::Tensor&, const at::Tensor&, const at::Tensor&)

// Instantiated elsewhere, one per file: declared here so no other file compiles them again.
extern UNET_EXT_SM90_FPROP(cutlass::half_t, true, false);
extern UNET_EXT_SM90_FPROP(cutlass::half_t, false, false);
extern UNET_EXT_SM90_FPROP(cutlass::bfloat16_t, true, false);
extern UNET_EXT_SM90_FPROP(cutlass::bfloat16_t, false, false);
extern UNET_EXT_SM90_FPROP(cutlass::half_t, true, true);
extern UNET_EXT_SM90_FPROP(cutlass::bfloat16_t, true, true);
extern UNET_EXT_SM90_DGRAD(cutlass::half_t);
extern UNET_EXT_SM90_DGRAD(cutlass::bfloat16_t);
extern UNET_EXT_SM90_WGRAD(cutlass::half_t);
extern UNET_EXT_SM90_WGRAD(cutlass::bfloat16_t);

}  // namespace sm90
}  // namespace conv
}  // namespace unet_ext
