// Host-side half of crop_concat shared by the CPU and CUDA entry points: argument checks,
// output allocation and the Geometry the kernels read. Kernels live in cpu/ and cuda/.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <utility>

#include "crop_concat.h"

namespace unet_ext {
namespace crop_concat {

// The checks every (skip, up) pair takes (crop_concat, conv2d_relu_concat): same batch, and up
// no larger than skip, which is centre-cropped to it.
void check_skip_up(const char* op, const at::Tensor& skip, const at::Tensor& up);

// Validates (skip, up), allocates the output in the memory format torch.cat would pick.
Geometry forward_geometry(const at::Tensor& skip, const at::Tensor& up, at::Tensor& out);

// Validates the backward's arguments and allocates grad_skip, grad_up in grad_out's format.
Geometry backward_geometry(const at::Tensor& grad_out, int64_t skip_channels, int64_t skip_height,
                           int64_t skip_width, at::Tensor& grad_skip, at::Tensor& grad_up);

// A copy depends only on the element size: Fn<word_t>::run for 1, 2, 4 or 8-byte elements, so
// one instantiation per size serves every dtype (CPU and CUDA kernels alike).
template <template <typename> class Fn, typename... Args>
void dispatch_element_size(int64_t element_size, Args&&... args) {
  switch (element_size) {
    case 1: return Fn<uint8_t>::run(std::forward<Args>(args)...);
    case 2: return Fn<uint16_t>::run(std::forward<Args>(args)...);
    case 4: return Fn<uint32_t>::run(std::forward<Args>(args)...);
    case 8: return Fn<uint64_t>::run(std::forward<Args>(args)...);
    default: TORCH_CHECK(false, "unet_ext.crop_concat: unsupported element size ", element_size);
  }
}

}  // namespace crop_concat
}  // namespace unet_ext
