// conv2d_relu / conv_transpose2x2 geometry shared by the CPU and CUDA kernels (torch-free).
// Stride 1, dilation 1, groups 1. The backward's dgrad of conv2d_relu is itself a convolution
// (of the masked gradient with the flipped, transposed weight, padding k - 1 - p), so a
// geometry's padding may be negative: it is only ever an offset between output and input.
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace unet_ext {
namespace conv {

UNET_HD int64_t conv_output_size(int64_t input, int64_t kernel, int64_t padding) {
  return input + 2 * padding - kernel + 1;
}

struct ConvGeometry {
  int64_t batch, in_channels, out_channels;
  int64_t in_h, in_w, out_h, out_w;
  int64_t kernel_h, kernel_w;
  int64_t pad_h, pad_w;

  // GEMM reduction size: one column of the implicit im2col matrix per (ci, ky, kx).
  UNET_HD int64_t taps() const { return in_channels * kernel_h * kernel_w; }
  UNET_HD int64_t input_row(int64_t oh, int64_t ky) const { return oh + ky - pad_h; }
  UNET_HD int64_t input_col(int64_t ow, int64_t kx) const { return ow + kx - pad_w; }
  // Output columns [first, last) whose tap kx reads inside the input row.
  UNET_HD int64_t first_valid_col(int64_t kx) const {
    const int64_t v = pad_w - kx;
    return v < 0 ? 0 : (v > out_w ? out_w : v);
  }
  UNET_HD int64_t last_valid_col(int64_t kx) const {
    const int64_t v = in_w + pad_w - kx, lo = first_valid_col(kx);
    return v < lo ? lo : (v > out_w ? out_w : v);
  }
};

// Geometry of the dgrad convolution: the masked grad_out (out_channels) in, grad_input out.
UNET_HD ConvGeometry dgrad_geometry(const ConvGeometry& g) {
  ConvGeometry d = g;
  d.in_channels = g.out_channels;
  d.out_channels = g.in_channels;
  d.in_h = g.out_h;
  d.in_w = g.out_w;
  d.out_h = g.in_h;
  d.out_w = g.in_w;
  d.pad_h = g.kernel_h - 1 - g.pad_h;
  d.pad_w = g.kernel_w - 1 - g.pad_w;
  return d;
}

// conv_transpose2x2: output pixel (2h + dy, 2w + dx) = bias + sum_ci x[ci, h, w] * W[ci, co, dy, dx].
// The four phases (dy, dx) never overlap, so it is one GEMM with 4 * C_out columns.
UNET_HD int64_t up_phase(int64_t co, int64_t dy, int64_t dx) { return (co * 2 + dy) * 2 + dx; }

}  // namespace conv
}  // namespace unet_ext
