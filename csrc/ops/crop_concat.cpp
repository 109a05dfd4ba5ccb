// crop_concat: argument checks, output allocation and geometry, shared by CPU and CUDA.
#include "crop_concat_host.h"

#include <ATen/ATen.h>

#include "common/checks.h"
#include "cpu/huge_pages.h"

namespace unet_ext {
namespace crop_concat {
namespace {

constexpr const char* kOp = "unet_ext.crop_concat";

Strides4 strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

bool is_channels_last(const at::Tensor& t) {
  return t.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
}

}  // namespace

void check_skip_up(const char* op, const at::Tensor& skip, const at::Tensor& up) {
  TORCH_CHECK(skip.size(0) == up.size(0), op, ": skip and up must have the same batch size, got ",
              skip.size(0), " and ", up.size(0));
  TORCH_CHECK(up.size(2) <= skip.size(2) && up.size(3) <= skip.size(3), op,
              ": up's spatial size must not exceed skip's (the skip is centre-cropped to up), got "
              "skip ", skip.sizes(), " and up ", up.sizes());
}

Geometry forward_geometry(const at::Tensor& skip, const at::Tensor& up, at::Tensor& out) {
  UNET_CHECK_DIM(kOp, skip, 4);
  UNET_CHECK_DIM(kOp, up, 4);
  UNET_CHECK_SAME_DEVICE(kOp, skip, up);
  UNET_CHECK_SAME_DTYPE(kOp, skip, up);
  check_skip_up(kOp, skip, up);

  Geometry g;
  g.batch = skip.size(0);
  g.skip_channels = skip.size(1);
  g.up_channels = up.size(1);
  g.skip_height = skip.size(2);
  g.skip_width = skip.size(3);
  g.height = up.size(2);
  g.width = up.size(3);
  g.top = centre_crop_offset(g.skip_height, g.height);
  g.left = centre_crop_offset(g.skip_width, g.width);
  // torch.cat keeps a memory format the inputs share and falls back to contiguous otherwise.
  g.channels_last = is_channels_last(skip) && is_channels_last(up);
  g.skip = strides_of(skip);
  g.up = strides_of(up);
  g.grad = {0, 0, 0, 0};
  out = cpu::empty_output({g.batch, g.channels(), g.height, g.width}, skip.options(),
                          g.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  return g;
}

Geometry backward_geometry(const at::Tensor& grad_out, int64_t skip_channels, int64_t skip_height,
                           int64_t skip_width, at::Tensor& grad_skip, at::Tensor& grad_up) {
  constexpr const char* op = "unet_ext._crop_concat_backward";
  UNET_CHECK_DIM(op, grad_out, 4);
  TORCH_CHECK(skip_channels >= 0 && skip_channels <= grad_out.size(1), op,
              ": skip_channels must be in [0, grad_out.size(1)=", grad_out.size(1), "], got ",
              skip_channels);
  TORCH_CHECK(skip_height >= grad_out.size(2) && skip_width >= grad_out.size(3), op,
              ": the skip's spatial size must be at least grad_out's ", grad_out.sizes().slice(2),
              ", got [", skip_height, ", ", skip_width, "]");

  Geometry g;
  g.batch = grad_out.size(0);
  g.skip_channels = skip_channels;
  g.up_channels = grad_out.size(1) - skip_channels;
  g.skip_height = skip_height;
  g.skip_width = skip_width;
  g.height = grad_out.size(2);
  g.width = grad_out.size(3);
  g.top = centre_crop_offset(skip_height, g.height);
  g.left = centre_crop_offset(skip_width, g.width);
  g.channels_last = is_channels_last(grad_out);
  g.skip = {0, 0, 0, 0};
  g.up = {0, 0, 0, 0};
  g.grad = strides_of(grad_out);
  const auto format = g.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  grad_skip = cpu::empty_output({g.batch, skip_channels, skip_height, skip_width}, grad_out.options(), format);
  grad_up = cpu::empty_output({g.batch, g.up_channels, g.height, g.width}, grad_out.options(), format);
  return g;
}

}  // namespace crop_concat
}  // namespace unet_ext
