// Host-side half of conv2d_relu / conv2d_bias / conv_transpose2x2 shared by the CPU and CUDA
// entry points: argument checks with messages that name the argument, and geometries.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "conv2d_relu.h"

namespace unet_ext {
namespace conv {

// Checks input (N, C_in, H, W), weight (C_out, C_in, kh, kw), bias (C_out,), padding >= 0 and
// that the kernel fits the padded input.
ConvGeometry conv2d_geometry(const char* op, const at::Tensor& input, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, int64_t padding);

// conv2d_relu_concat: checks skip (N, Cs, Hs, Ws), up (N, Cu, H, W) with H <= Hs, W <= Ws,
// weight (C_out, Cs + Cu, kh, kw), bias (C_out,), padding; the crop offset is centre_crop_offset.
ConcatGeometry conv2d_concat_geometry(const char* op, const at::Tensor& skip, const at::Tensor& up,
                                      const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                      int64_t padding);

// Checks input (N, C_in, H, W), weight (C_in, C_out, 2, 2), bias (C_out,). Output (N, C_out, 2H, 2W).
ConvGeometry conv_transpose2x2_geometry(const char* op, const at::Tensor& input,
                                        const at::Tensor& weight,
                                        const std::optional<at::Tensor>& bias);

// The memory format conv outputs (and gradients) use: channels_last iff the input is.
at::MemoryFormat conv_memory_format(const at::Tensor& input);
// conv2d_relu_concat's output: channels_last iff both inputs are (the format crop_concat gives).
at::MemoryFormat conv_memory_format(const at::Tensor& skip, const at::Tensor& up);

// t in its opmath dtype (float for 16-bit types), contiguous: weights and biases as the kernels read them.
at::Tensor opmath_contiguous(const at::Tensor& t);

}  // namespace conv
}  // namespace unet_ext
