// Autocast of the convolutions (conv2d_relu, conv2d_bias, conv2d_relu_concat, conv_transpose2x2):
// F.conv2d's and F.conv_transpose2d's policy, every floating-point argument (input, skip, up,
// weight, bias) in the autocast dtype, so the output is in it too and the 16-bit kernels run.
#include "autocast.h"

#include <ATen/Context.h>

#include "../cpu/cpu_isa.h"

namespace unet_ext {
namespace autocast {
namespace {

using OptionalTensor = std::optional<at::Tensor>;
using ConvSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const OptionalTensor&, int64_t);

// The weight in the autocast dtype. A CPU convolution with channels_last activations under bf16
// autocast runs on oneDNN's nhwc kernels where the CPU has bf16 dot products (cpu/conv2d_kernel.h,
// use_onednn), which clone an NCHW weight to channels_last in the forward and in the backward and
// return the weight gradient channels_last: there the float32 weight goes to bf16 channels_last in
// one pass (unet_ext::_cast_weight, whose backward gives the float32 gradient in the weight's
// layout in one pass too) instead of stock's cast and oneDNN's two clones, and the gradient's
// transposing copy and cast. Like stock's cached cast, it is made afresh in each autocast region
// (and not cached within one: the U-Net uses each weight once per forward).
template <c10::DeviceType device>
at::Tensor autocast_weight(const at::Tensor& weight, const at::Tensor& activation) {
  if (device == c10::DeviceType::CPU && weight.scalar_type() == at::kFloat && weight.device().is_cpu() &&
      weight.dim() == 4 && weight.is_contiguous() && activation.dim() == 4 && activation.size(1) > 1 &&
      activation.is_contiguous(at::MemoryFormat::ChannelsLast) && at::autocast::get_autocast_dtype(device) == at::kBFloat16 &&
      at::globalContext().userEnabledMkldnn() && cpu::has_bf16_dot_products()) {
    static const auto cast = find_op<at::Tensor(const at::Tensor&, at::ScalarType, at::MemoryFormat)>("unet_ext::_cast_weight");
    return cast.call(weight, at::kBFloat16, at::MemoryFormat::ChannelsLast);
  }
  return in_autocast_dtype<device>(weight);
}

template <c10::DeviceType device>
at::Tensor conv2d_relu_autocast(const at::Tensor& input, const at::Tensor& weight,
                                const OptionalTensor& bias, int64_t padding) {
  static const auto op = find_op<ConvSignature>("unet_ext::conv2d_relu");
  BelowAutocast<device> below;
  return op.call(in_autocast_dtype<device>(input), autocast_weight<device>(weight, input),
                 in_autocast_dtype<device>(bias), padding);
}

template <c10::DeviceType device>
at::Tensor conv2d_bias_autocast(const at::Tensor& input, const at::Tensor& weight,
                                const OptionalTensor& bias, int64_t padding) {
  static const auto op = find_op<ConvSignature>("unet_ext::conv2d_bias");
  BelowAutocast<device> below;
  return op.call(in_autocast_dtype<device>(input), autocast_weight<device>(weight, input),
                 in_autocast_dtype<device>(bias), padding);
}

template <c10::DeviceType device>
at::Tensor conv2d_relu_concat_autocast(const at::Tensor& skip, const at::Tensor& up,
                                       const at::Tensor& weight, const OptionalTensor& bias,
                                       int64_t padding) {
  static const auto op = find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            const OptionalTensor&, int64_t)>("unet_ext::conv2d_relu_concat");
  BelowAutocast<device> below;
  return op.call(in_autocast_dtype<device>(skip), in_autocast_dtype<device>(up),
                 autocast_weight<device>(weight, up), in_autocast_dtype<device>(bias), padding);
}

template <c10::DeviceType device>
at::Tensor conv_transpose2x2_autocast(const at::Tensor& input, const at::Tensor& weight,
                                      const OptionalTensor& bias) {
  static const auto op = find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const OptionalTensor&)>(
      "unet_ext::conv_transpose2x2");
  BelowAutocast<device> below;
  return op.call(in_autocast_dtype<device>(input), autocast_weight<device>(weight, input),
                 in_autocast_dtype<device>(bias));
}

template <c10::DeviceType device>
void register_conv_autocast(torch::Library& m) {
  m.impl("conv2d_relu", TORCH_FN(conv2d_relu_autocast<device>));
  m.impl("conv2d_bias", TORCH_FN(conv2d_bias_autocast<device>));
  m.impl("conv2d_relu_concat", TORCH_FN(conv2d_relu_concat_autocast<device>));
  m.impl("conv_transpose2x2", TORCH_FN(conv_transpose2x2_autocast<device>));
}

}  // namespace
}  // namespace autocast
}  // namespace unet_ext

UNET_AUTOCAST_REGISTER(unet_ext::autocast::register_conv_autocast)
