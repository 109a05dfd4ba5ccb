// conv2d_relu, conv2d_bias, conv2d_relu_concat and conv_transpose2x2: argument checks shared by CPU and CUDA.
#include "conv_host.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include "common/checks.h"
#include "crop_concat_host.h"

namespace unet_ext {
namespace conv {
namespace {

void check_common(const char* op, const at::Tensor& input, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, int64_t out_channels) {
  UNET_CHECK_DIM(op, input, 4);
  UNET_CHECK_DIM(op, weight, 4);
  UNET_CHECK_FLOATING(op, input);
  UNET_CHECK_SAME_DEVICE(op, input, weight);
  UNET_CHECK_SAME_DTYPE(op, input, weight);
  if (bias.has_value() && bias->defined()) {
    const at::Tensor& b = *bias;
    UNET_CHECK_SAME_DEVICE(op, input, b);
    UNET_CHECK_SAME_DTYPE(op, input, b);
    TORCH_CHECK(b.dim() == 1 && b.size(0) == out_channels, op, ": bias must have shape [",
                out_channels, "] (one value per output channel), got ", b.sizes());
  }
}

}  // namespace

at::MemoryFormat conv_memory_format(const at::Tensor& input) {
  return input.suggest_memory_format() == at::MemoryFormat::ChannelsLast
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

at::MemoryFormat conv_memory_format(const at::Tensor& skip, const at::Tensor& up) {
  return conv_memory_format(skip) == at::MemoryFormat::ChannelsLast &&
                 conv_memory_format(up) == at::MemoryFormat::ChannelsLast
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

at::MemoryFormat conv_output_format(const at::Tensor& input, const at::Tensor& weight) {
  return conv_memory_format(input) == at::MemoryFormat::ChannelsLast ||
                 conv_memory_format(weight) == at::MemoryFormat::ChannelsLast
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

at::MemoryFormat conv_output_format(const at::Tensor& skip, const at::Tensor& up, const at::Tensor& weight) {
  return conv_memory_format(skip, up) == at::MemoryFormat::ChannelsLast ||
                 conv_memory_format(weight) == at::MemoryFormat::ChannelsLast
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

at::Tensor opmath_contiguous(const at::Tensor& t) {
  return t.to(at::toOpMathType(t.scalar_type())).contiguous();
}

namespace {

// The geometry of a stride-1 convolution of a (batch, channels, height, width) input, once the
// input's own checks are done; `input_desc` names the input in messages.
ConvGeometry conv2d_geometry_of(const char* op, const char* input_desc, int64_t batch,
                                int64_t channels, int64_t height, int64_t width,
                                const at::Tensor& weight, int64_t padding) {
  TORCH_CHECK(padding >= 0, op, ": padding must be >= 0, got ", padding);
  TORCH_CHECK(weight.size(1) == channels, op, ": weight must have shape [C_out, ", channels,
              ", kh, kw] to match ", input_desc, " ", channels, " channels, got weight of shape ",
              weight.sizes());
  TORCH_CHECK(weight.size(2) >= 1 && weight.size(3) >= 1, op,
              ": weight's kernel size must be at least 1x1, got ", weight.sizes());
  ConvGeometry g;
  g.batch = batch;
  g.in_channels = channels;
  g.out_channels = weight.size(0);
  g.in_h = height;
  g.in_w = width;
  g.kernel_h = weight.size(2);
  g.kernel_w = weight.size(3);
  g.pad_h = g.pad_w = padding;
  g.out_h = conv_output_size(g.in_h, g.kernel_h, padding);
  g.out_w = conv_output_size(g.in_w, g.kernel_w, padding);
  TORCH_CHECK(g.out_h >= 1 && g.out_w >= 1, op, ": kernel ", g.kernel_h, "x", g.kernel_w,
              " is larger than the padded input ", g.in_h + 2 * padding, "x", g.in_w + 2 * padding,
              " (input [", height, ", ", width, "], padding ", padding, ")");
  return g;
}

}  // namespace

ConvGeometry conv2d_geometry(const char* op, const at::Tensor& input, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, int64_t padding) {
  check_common(op, input, weight, bias, weight.dim() == 4 ? weight.size(0) : 0);
  return conv2d_geometry_of(op, "input's", input.size(0), input.size(1), input.size(2),
                            input.size(3), weight, padding);
}

ConcatGeometry conv2d_concat_geometry(const char* op, const at::Tensor& skip, const at::Tensor& up,
                                      const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                      int64_t padding) {
  // The checks check_common makes, naming skip (its own messages say "input").
  UNET_CHECK_DIM(op, skip, 4);
  UNET_CHECK_DIM(op, up, 4);
  UNET_CHECK_DIM(op, weight, 4);
  UNET_CHECK_FLOATING(op, skip);
  UNET_CHECK_SAME_DEVICE(op, skip, up);
  UNET_CHECK_SAME_DEVICE(op, skip, weight);
  UNET_CHECK_SAME_DTYPE(op, skip, up);
  UNET_CHECK_SAME_DTYPE(op, skip, weight);
  check_common(op, skip, weight, bias, weight.size(0));  // the bias
  crop_concat::check_skip_up(op, skip, up);
  ConcatGeometry c;
  c.conv = conv2d_geometry_of(op, "skip's + up's", skip.size(0), skip.size(1) + up.size(1),
                              up.size(2), up.size(3), weight, padding);
  c.skip_channels = skip.size(1);
  c.skip_h = skip.size(2);
  c.skip_w = skip.size(3);
  c.top = crop_concat::centre_crop_offset(c.skip_h, up.size(2));
  c.left = crop_concat::centre_crop_offset(c.skip_w, up.size(3));
  return c;
}

ConvGeometry conv_transpose2x2_geometry(const char* op, const at::Tensor& input,
                                        const at::Tensor& weight,
                                        const std::optional<at::Tensor>& bias) {
  check_common(op, input, weight, bias, weight.dim() == 4 ? weight.size(1) : 0);
  TORCH_CHECK(weight.size(0) == input.size(1) && weight.size(2) == 2 && weight.size(3) == 2, op,
              ": weight must have shape [", input.size(1), ", C_out, 2, 2] (C_in = input's ",
              "channels), got ", weight.sizes());
  ConvGeometry g;
  g.batch = input.size(0);
  g.in_channels = input.size(1);
  g.out_channels = weight.size(1);
  g.in_h = input.size(2);
  g.in_w = input.size(3);
  g.kernel_h = g.kernel_w = 2;
  g.pad_h = g.pad_w = 0;
  g.out_h = 2 * g.in_h;
  g.out_w = 2 * g.in_w;
  return g;
}

}  // namespace conv
}  // namespace unet_ext
