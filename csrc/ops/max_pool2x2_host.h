// Host-side half of max_pool2x2 shared by the CPU and CUDA entry points: argument checks, the
// dense input the kernels read, output allocation and the Geometry. Kernels live in cpu/, cuda/.
#pragma once

#include <ATen/core/Tensor.h>

#include "max_pool2x2.h"

namespace unet_ext {
namespace max_pool {

// Checks `input`, makes it dense in its suggested memory format (in place of the argument) and
// allocates `out` (N, C, H / 2, W / 2) in that format.
Geometry forward_geometry(at::Tensor& input, at::Tensor& out);

// Checks (grad_out, input), makes both dense in input's format and allocates grad_input.
Geometry backward_geometry(at::Tensor& grad_out, at::Tensor& input, at::Tensor& grad_input);

}  // namespace max_pool
}  // namespace unet_ext
