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

// Where a convolution's input (or dgrad's output) channels live: channels [0, split) in one NCHW
// tensor, [split, C) in another, each with its own image / channel-plane / row strides (elements;
// columns are unit-stride). conv2d_relu_concat reads the centre-cropped skip (data[0] points at
// the crop window's top-left, rows keep the skip's pitch) and the up map this way, so the
// concatenation is never materialised. A single tensor is one part (split = C).
template <typename T>
struct ChannelParts {
  T* data[2];
  int64_t image[2], plane[2], row[2];
  int64_t split;

  UNET_HD int part(int64_t c) const { return c < split ? 0 : 1; }
  // Channel c's plane of image n (its row 0, column 0). Selects, not data[part(c)]: a kernel
  // parameter indexed at run time could be copied to local memory.
  UNET_HD T* channel(int64_t n, int64_t c) const {
    return c < split ? data[0] + n * image[0] + c * plane[0]
                     : data[1] + n * image[1] + (c - split) * plane[1];
  }
  UNET_HD int64_t row_stride(int64_t c) const { return c < split ? row[0] : row[1]; }
  UNET_HD T* at(int64_t n, int64_t c, int64_t h) const { return channel(n, c) + h * row_stride(c); }
};

// A dense NCHW tensor (channels, height, width) as a single part.
template <typename T>
UNET_HD ChannelParts<T> dense_parts(T* data, int64_t channels, int64_t height, int64_t width) {
  ChannelParts<T> p;
  for (int i = 0; i < 2; ++i) {
    p.data[i] = data;
    p.image[i] = channels * height * width;
    p.plane[i] = height * width;
    p.row[i] = width;
  }
  p.split = channels;
  return p;
}

// conv2d_relu_concat's input: skip (N, Cs, Hs, Ws) centre-cropped at (top, left) to up's
// (N, Cu, H, W), then up; both dense NCHW.
template <typename T>
UNET_HD ChannelParts<T> concat_parts(T* skip, int64_t skip_channels, int64_t skip_h, int64_t skip_w,
                                     int64_t top, int64_t left, T* up, int64_t up_channels,
                                     int64_t height, int64_t width) {
  ChannelParts<T> p;
  p.data[0] = skip + top * skip_w + left;
  p.image[0] = skip_channels * skip_h * skip_w;
  p.plane[0] = skip_h * skip_w;
  p.row[0] = skip_w;
  p.data[1] = up;
  p.image[1] = up_channels * height * width;
  p.plane[1] = height * width;
  p.row[1] = width;
  p.split = skip_channels;
  return p;
}

// conv2d_relu_concat: the convolution's geometry (input = the concatenation, up's size) and
// where the skip's crop window starts.
struct ConcatGeometry {
  ConvGeometry conv;
  int64_t skip_channels, skip_h, skip_w, top, left;

  template <typename T>
  UNET_HD ChannelParts<T> parts(T* skip, T* up) const {
    return concat_parts(skip, skip_channels, skip_h, skip_w, top, left, up,
                        conv.in_channels - skip_channels, conv.in_h, conv.in_w);
  }
};

// conv_transpose2x2: output pixel (2h + dy, 2w + dx) = bias + sum_ci x[ci, h, w] * W[ci, co, dy, dx].
// The four phases (dy, dx) never overlap, so it is one GEMM with 4 * C_out columns.
UNET_HD int64_t up_phase(int64_t co, int64_t dy, int64_t dx) { return (co * 2 + dy) * 2 + dx; }

}  // namespace conv
}  // namespace unet_ext
