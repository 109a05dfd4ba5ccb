// Which conv problems go to the Hopper kernels, and the dtype dispatch to them (the kernels: one
// per conv2d_cutlass_sm90_<op>_<dtype>.cu). Only sm_90a runs wgmma, so they exist only when the
// build's arch list names 9.0a (UNET_EXT_SM90A); elsewhere every entry point declines and
// conv2d_cutlass.cu's sm_80 kernels serve. wgrad runs here only where its GEMM has enough output
// tiles to fill the GPU: CUTLASS's sm_90 conv has no split-K, and the shallow layers' long pixel
// reduction over a few tiles needs one (the sm_80 kernel's serial split-K).
#include "conv2d_cutlass_sm90.h"

#include <ATen/cuda/CUDAContext.h>

#include <cstdlib>
#include <cstring>

#include "conv2d_cutlass.h"

#if defined(UNET_EXT_SM90A)
#include "conv2d_cutlass_sm90_kernels.h"
#endif

namespace unet_ext {
namespace conv {
namespace {

// UNET_EXT_SM90=0 turns the Hopper kernels off (the sm_80 ones serve): one build, one GPU, both
// kernel families compared (scripts/device_profile.py). Read once, at the first convolution.
[[maybe_unused]] bool sm90_enabled() {
  static const bool enabled = [] {
    const char* value = std::getenv("UNET_EXT_SM90");
    return value == nullptr || std::strcmp(value, "0") != 0;
  }();
  return enabled;
}

// Only 16-bit float, on an sm_90 device (the sm_90a kernels run nowhere else), and padding up to
// k - 1 (U-Net's 0 and k / 2; larger padding gives dgrad a negative padding, left to sm_80).
[[maybe_unused]] bool sm90_fits(const ConvGeometry& g, at::ScalarType dtype) {
  if (dtype != at::kHalf && dtype != at::kBFloat16) return false;
  if (!sm90_enabled()) return false;
  if (g.pad_h > g.kernel_h - 1 || g.pad_w > g.kernel_w - 1) return false;
  const cudaDeviceProp* properties = at::cuda::getCurrentDeviceProperties();
  return properties->major == 9 && properties->minor == 0 && conv2d_cutlass_fits(g, dtype);
}

}  // namespace

#if defined(UNET_EXT_SM90A)

// Output tiles of the wgrad GEMM (C_out x C_in*kh*kw) from which one CTA per tile fills an H100
// (132 SMs) about once; below that the sm_80 kernel's split-K spreads the pixel reduction.
// A shape-only rule, so that which kernel (and summation order) runs does not depend on the GPU.
constexpr int64_t kWgradMinTiles = 128;

bool conv2d_forward_sm90(const ConvGeometry& g, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                         bool relu, const at::Tensor& output) {
  if (!sm90_fits(g, x.scalar_type())) return false;
  // 128x64 tiles where C_out <= 64 (ReLU layers: the U-Net's 64-channel levels).
  const bool narrow = relu && g.out_channels <= 64;
  if (x.scalar_type() == at::kHalf) {
    if (narrow) return sm90::fprop<cutlass::half_t, true, true>(g, x, w, b, output);
    return relu ? sm90::fprop<cutlass::half_t, true, false>(g, x, w, b, output)
                : sm90::fprop<cutlass::half_t, false, false>(g, x, w, b, output);
  }
  if (narrow) return sm90::fprop<cutlass::bfloat16_t, true, true>(g, x, w, b, output);
  return relu ? sm90::fprop<cutlass::bfloat16_t, true, false>(g, x, w, b, output)
              : sm90::fprop<cutlass::bfloat16_t, false, false>(g, x, w, b, output);
}

bool conv2d_dgrad_sm90(const ConvGeometry& g, const at::Tensor& dy, const at::Tensor& w, const at::Tensor& dx) {
  if (!sm90_fits(g, dy.scalar_type())) return false;
  return dy.scalar_type() == at::kHalf ? sm90::dgrad<cutlass::half_t>(g, dy, w, dx)
                                       : sm90::dgrad<cutlass::bfloat16_t>(g, dy, w, dx);
}

bool conv2d_wgrad_sm90(const ConvGeometry& g, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& dw) {
  if (!sm90_fits(g, dy.scalar_type())) return false;
  const int64_t tiles = ((g.out_channels + 127) / 128) * ((g.in_channels * g.kernel_h * g.kernel_w + 127) / 128);
  if (tiles < kWgradMinTiles) return false;
  return dy.scalar_type() == at::kHalf ? sm90::wgrad<cutlass::half_t>(g, dy, x, dw)
                                       : sm90::wgrad<cutlass::bfloat16_t>(g, dy, x, dw);
}

#else  // built without sm_90a: the sm_80 kernels serve on Hopper too

bool conv2d_forward_sm90(const ConvGeometry&, const at::Tensor&, const at::Tensor&, const at::Tensor&, bool,
                         const at::Tensor&) {
  return false;
}
bool conv2d_dgrad_sm90(const ConvGeometry&, const at::Tensor&, const at::Tensor&, const at::Tensor&) { return false; }
bool conv2d_wgrad_sm90(const ConvGeometry&, const at::Tensor&, const at::Tensor&, const at::Tensor&) { return false; }

#endif

}  // namespace conv
}  // namespace unet_ext
