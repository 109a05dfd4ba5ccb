// Autocast of weighted_cross_entropy: F.cross_entropy's policy ("fp32"), computed and returned in
// float32. 16-bit logits are not cast: the kernels read them as they are and compute in float32
// (their opmath), so the float32 loss comes without a float32 copy of the logits, and the saved
// logits (and the logits' gradient) stay 16-bit. Weight map and class weights go to float32.
#include "autocast.h"

namespace unet_ext {
namespace autocast {
namespace {

using OptionalTensor = std::optional<at::Tensor>;

template <c10::DeviceType device>
at::Tensor weighted_cross_entropy_autocast(const at::Tensor& logits, const at::Tensor& target,
                                           const OptionalTensor& weight_map,
                                           const OptionalTensor& class_weight, int64_t ignore_index,
                                           c10::string_view reduction) {
  static const auto forward =
      find_op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
          const at::Tensor&, const at::Tensor&, const OptionalTensor&, const OptionalTensor&, int64_t,
          c10::string_view, bool)>("unet_ext::_weighted_cross_entropy_forward");
  BelowAutocast<device> below;
  // opmath_loss: the loss in float32 for 16-bit logits (float32 and float64 logits: their own).
  return std::get<0>(forward.call(logits, target, in_float32<device>(weight_map),
                                  in_float32<device>(class_weight), ignore_index, reduction,
                                  /*opmath_loss=*/true));
}

template <c10::DeviceType device>
void register_weighted_cross_entropy_autocast(torch::Library& m) {
  m.impl("weighted_cross_entropy", TORCH_FN(weighted_cross_entropy_autocast<device>));
}

}  // namespace
}  // namespace autocast
}  // namespace unet_ext

UNET_AUTOCAST_REGISTER(unet_ext::autocast::register_weighted_cross_entropy_autocast)
