// Autocast of the convolutions (conv2d_relu, conv2d_bias, conv2d_relu_concat, conv_transpose2x2):
// F.conv2d's and F.conv_transpose2d's policy, every floating-point argument (input, skip, up,
// weight, bias) in the autocast dtype, so the output is in it too and the 16-bit kernels run.
#include "autocast.h"

namespace unet_ext {
namespace autocast {
namespace {

using OptionalTensor = std::optional<at::Tensor>;
using ConvSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const OptionalTensor&, int64_t);

template <c10::DeviceType device>
at::Tensor conv2d_relu_autocast(const at::Tensor& input, const at::Tensor& weight,
                                const OptionalTensor& bias, int64_t padding) {
  static const auto op = find_op<ConvSignature>("unet_ext::conv2d_relu");
  BelowAutocast<device> below;
  return op.call(in_autocast_dtype<device>(input), in_autocast_dtype<device>(weight),
                 in_autocast_dtype<device>(bias), padding);
}

template <c10::DeviceType device>
at::Tensor conv2d_bias_autocast(const at::Tensor& input, const at::Tensor& weight,
                                const OptionalTensor& bias, int64_t padding) {
  static const auto op = find_op<ConvSignature>("unet_ext::conv2d_bias");
  BelowAutocast<device> below;
  return op.call(in_autocast_dtype<device>(input), in_autocast_dtype<device>(weight),
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
                 in_autocast_dtype<device>(weight), in_autocast_dtype<device>(bias), padding);
}

template <c10::DeviceType device>
at::Tensor conv_transpose2x2_autocast(const at::Tensor& input, const at::Tensor& weight,
                                      const OptionalTensor& bias) {
  static const auto op = find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const OptionalTensor&)>(
      "unet_ext::conv_transpose2x2");
  BelowAutocast<device> below;
  return op.call(in_autocast_dtype<device>(input), in_autocast_dtype<device>(weight),
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
