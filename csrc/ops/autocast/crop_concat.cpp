// Autocast of crop_concat: torch.cat's policy ("promote"), both inputs in the widest floating-point
// dtype of the two (float32 + bfloat16 -> float32, bfloat16 + bfloat16 -> bfloat16: nothing is cast
// down). Integer inputs are left alone, so a mix of integer and float stays the op's dtype error.
#include "autocast.h"

namespace unet_ext {
namespace autocast {
namespace {

// The promoted type of the floating-point inputs, as torch.cat's own type promotion (which
// at::autocast::promote_type narrows: it rejects float16 + bfloat16 and ignores float64).
at::ScalarType widest(const at::Tensor& skip, const at::Tensor& up) {
  if (!at::isFloatingType(skip.scalar_type())) return up.scalar_type();
  if (!at::isFloatingType(up.scalar_type())) return skip.scalar_type();
  return at::promote_types(skip.scalar_type(), up.scalar_type());
}

template <c10::DeviceType device>
at::Tensor cast_floating(const at::Tensor& t, at::ScalarType to) {
  return at::isFloatingType(t.scalar_type()) && t.device().type() == device ? t.to(to) : t;
}

template <c10::DeviceType device>
at::Tensor crop_concat_autocast(const at::Tensor& skip, const at::Tensor& up) {
  static const auto op = find_op<at::Tensor(const at::Tensor&, const at::Tensor&)>("unet_ext::crop_concat");
  BelowAutocast<device> below;
  const at::ScalarType to = widest(skip, up);
  return op.call(cast_floating<device>(skip, to), cast_floating<device>(up, to));
}

template <c10::DeviceType device>
void register_crop_concat_autocast(torch::Library& m) {
  m.impl("crop_concat", TORCH_FN(crop_concat_autocast<device>));
}

}  // namespace
}  // namespace autocast
}  // namespace unet_ext

UNET_AUTOCAST_REGISTER(unet_ext::autocast::register_crop_concat_autocast)
