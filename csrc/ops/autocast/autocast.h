// Autocast kernels of the unet_ext ops (one file per op, as torchvision's ops/autocast): each casts
// its floating-point arguments as stock PyTorch's autocast casts those of the op it replaces, then
// calls the op again with this device's autocast key excluded (so autograd and the backend kernel
// below see already-cast tensors). The kernels are templates on the device and are registered for
// AutocastCPU and AutocastCUDA from the same .cpp file, so a CPU-only build compiles and tests the
// CUDA policy too. Without autocast these kernels are never reached: the eager path is unchanged.
// max_pool2x2 has none on purpose: like F.max_pool2d it keeps its input's dtype (autocast falls
// through), and the backward ops are called by autograd with tensors already in the right dtypes.
#pragma once

#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <optional>

namespace unet_ext {
namespace autocast {

constexpr c10::DispatchKey dispatch_key(c10::DeviceType device) {
  return device == c10::DeviceType::CUDA ? c10::DispatchKey::AutocastCUDA
                                         : c10::DispatchKey::AutocastCPU;
}

// While alive, calls dispatch below this device's autocast (the op runs once, not back into here).
template <c10::DeviceType device>
struct BelowAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{dispatch_key(device)};
};

// F.conv2d's policy ("lower_precision_fp"): float32 (and 16-bit) tensors of this device in the
// autocast dtype; float64, integer and other devices' tensors as they are, so the op's own checks
// still name them. Leaf weights' casts are cached for the autocast region, as stock's are.
template <c10::DeviceType device, typename T>
auto in_autocast_dtype(const T& arg) {
  return at::autocast::cached_cast(at::autocast::get_autocast_dtype(device), arg, device);
}

// F.cross_entropy's policy ("fp32"): 16-bit tensors of this device in float32.
template <c10::DeviceType device, typename T>
auto in_float32(const T& arg) {
  return at::autocast::cached_cast(at::kFloat, arg, device);
}

// The typed handle of a unet_ext op (found once per call site).
template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace autocast
}  // namespace unet_ext

// Registers register_kernels<CPU>(m) for AutocastCPU and register_kernels<CUDA>(m) for AutocastCUDA.
#define UNET_AUTOCAST_REGISTER(register_kernels)                                     \
  TORCH_LIBRARY_IMPL(unet_ext, AutocastCPU, m) {                                     \
    register_kernels<c10::DeviceType::CPU>(m);                                       \
  }                                                                                  \
  TORCH_LIBRARY_IMPL(unet_ext, AutocastCUDA, m) {                                    \
    register_kernels<c10::DeviceType::CUDA>(m);                                      \
  }
