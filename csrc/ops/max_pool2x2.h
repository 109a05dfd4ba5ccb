// max_pool2x2: the U-Net down-step, F.max_pool2d(input, 2) (stride 2, floor: an odd last row or
// column is dropped). Torch-free math shared by the CPU and CUDA kernels: the window's maximum and
// which of its four elements that is, with stock PyTorch's rule (a later element wins when it is
// greater or NaN: the first of tied maxima, the last NaN). The backward recomputes that index
// from the input, so no index tensor is stored (stock stores one int64 per output).
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace unet_ext {
namespace max_pool {

struct Geometry {
  int64_t batch, channels, in_h, in_w, out_h, out_w;
  bool channels_last;  // dense NHWC input and output (else dense NCHW)
};

UNET_HD int64_t pooled_size(int64_t n) { return n / 2; }

template <typename acc_t>
UNET_HD bool is_nan(acc_t v) { return v != v; }

// Stock's scan over the window (v00, v01, v10, v11, row-major): which later element takes over
// the running maximum. The argmax is the last one that does (v00 when none does).
struct Takes {
  bool v01, v10, v11;
};

template <typename acc_t>
UNET_HD Takes window_takes(acc_t v00, acc_t v01, acc_t v10, acc_t v11) {
  Takes t;
  // | and & rather than || and &&: no short-circuit branches (random data mispredicts them).
  t.v01 = (v01 > v00) | is_nan(v01);
  const acc_t m01 = t.v01 ? v01 : v00;
  t.v10 = (v10 > m01) | is_nan(v10);
  const acc_t m10 = t.v10 ? v10 : m01;
  t.v11 = (v11 > m10) | is_nan(v11);
  return t;
}

// Index 0..3 of the window's argmax.
UNET_HD int window_argmax(Takes t) { return t.v11 ? 3 : t.v10 ? 2 : t.v01 ? 1 : 0; }

// The window's maximum alone, branch-free (vectorises), same rule: NaN propagates.
template <typename acc_t>
UNET_HD acc_t later_wins(acc_t m, acc_t v) { return ((v > m) | is_nan(v)) ? v : m; }

template <typename acc_t>
UNET_HD acc_t window_max(acc_t v00, acc_t v01, acc_t v10, acc_t v11) {
  return later_wins(later_wins(later_wins(v00, v01), v10), v11);
}

}  // namespace max_pool
}  // namespace unet_ext
