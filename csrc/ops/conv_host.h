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

// The memory format of a tensor as the kernels take it (and of an input's gradient): channels_last
// iff it suggests so.
at::MemoryFormat conv_memory_format(const at::Tensor& input);
// Both channels_last (the format crop_concat gives two inputs).
at::MemoryFormat conv_memory_format(const at::Tensor& skip, const at::Tensor& up);

// The output's format, by stock's rule (cuDNN's and oneDNN's, conv2d and conv_transpose2d alike):
// channels_last when the input or the weight is. A model converted with .to(channels_last) has
// channels_last weights, but its one-channel input (and the first layer's one-channel weight)
// is ambiguous and stays NCHW; following the input alone kept every later layer in NCHW, each
// converting its activations to NHWC and back: 55% of the UNet's time on the first H200 lease.
at::MemoryFormat conv_output_format(const at::Tensor& input, const at::Tensor& weight);
// conv2d_relu_concat's output: channels_last when both inputs are (crop_concat's format, torch.cat's
// rule) or the weight is.
at::MemoryFormat conv_output_format(const at::Tensor& skip, const at::Tensor& up, const at::Tensor& weight);

// t in its opmath dtype (float for 16-bit types), contiguous: weights and biases as the kernels read them.
at::Tensor opmath_contiguous(const at::Tensor& t);

}  // namespace conv
}  // namespace unet_ext
