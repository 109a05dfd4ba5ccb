// Autocast of weighted_cross_entropy: F.cross_entropy's policy ("fp32"), 16-bit logits, weight map
// and class weights in float32, so the loss is computed and returned in float32 as stock's is.
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
  static const auto op = find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const OptionalTensor&,
                                            const OptionalTensor&, int64_t, c10::string_view)>(
      "unet_ext::weighted_cross_entropy");
  BelowAutocast<device> below;
  return op.call(in_float32<device>(logits), target, in_float32<device>(weight_map),
                 in_float32<device>(class_weight), ignore_index, reduction);
}

template <c10::DeviceType device>
void register_weighted_cross_entropy_autocast(torch::Library& m) {
  m.impl("weighted_cross_entropy", TORCH_FN(weighted_cross_entropy_autocast<device>));
}

}  // namespace
}  // namespace autocast
}  // namespace unet_ext

UNET_AUTOCAST_REGISTER(unet_ext::autocast::register_weighted_cross_entropy_autocast)
