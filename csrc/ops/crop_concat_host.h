// Host-side half of crop_concat shared by the CPU and CUDA entry points: argument checks,
// output allocation and the Geometry the kernels read. Kernels live in cpu/ and cuda/.
#pragma once

#include <ATen/core/Tensor.h>

#include "crop_concat.h"

namespace unet_ext {
namespace crop_concat {

// Validates (skip, up), allocates the output in the memory format torch.cat would pick.
Geometry forward_geometry(const at::Tensor& skip, const at::Tensor& up, at::Tensor& out);

// Validates the backward's arguments and allocates grad_skip, grad_up in grad_out's format.
Geometry backward_geometry(const at::Tensor& grad_out, int64_t skip_channels, int64_t skip_height,
                           int64_t skip_width, at::Tensor& grad_skip, at::Tensor& grad_up);

}  // namespace crop_concat
}  // namespace unet_ext
