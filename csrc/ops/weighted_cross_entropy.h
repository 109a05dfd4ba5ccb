// weighted_cross_entropy math shared by the CPU and CUDA kernels (torch-free, UNET_HD).
// Logits are viewed as (N, C, S) with strides (n, c, s): S is the flattened spatial size, and
// any layout whose spatial dims collapse to one stride (NCHW, NHWC, (N, C)) is read in place.
// Per pixel: loss = weight_map * class_weight[t] * (logsumexp(logits) - logits[t]).
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace unet_ext {
namespace wce {

enum Reduction : int { kNone = 0, kMean = 1, kSum = 2 };

struct PixelStrides {
  int64_t n, c, s;
};

struct Geometry {
  int64_t batch, classes, pixels;  // N, C, S
  PixelStrides logits;             // strides of the (N, C, S) view of logits
  PixelStrides grad_logits;        // same for grad_logits (backward)
  int64_t target_n, target_s;      // target as (N, S)
  int64_t weight_n, weight_s;      // weight_map as (N, S); unused without a weight map
  int64_t grad_n, grad_s;          // grad_loss as (N, S) for reduction "none"
  int64_t ignore_index;
  int reduction;
  bool has_weight_map, has_class_weight;

  UNET_HD int64_t logit_offset(int64_t n, int64_t c, int64_t s) const {
    return n * logits.n + c * logits.c + s * logits.s;
  }
};

UNET_HD bool is_ignored(int64_t target, int64_t ignore_index) { return target == ignore_index; }

UNET_HD bool in_range(int64_t target, int64_t classes) { return target >= 0 && target < classes; }

// Online (single pass) logsumexp: fold x into the running (max, sum of exp(x - max)).
// exp_fn is the backend's exp, so CPU and CUDA share the recurrence but not the intrinsic.
template <typename T, typename ExpFn>
UNET_HD void logsumexp_update(T& running_max, T& running_sum, T x, ExpFn exp_fn) {
  if (x > running_max) {
    running_sum = running_sum * exp_fn(running_max - x) + T(1);
    running_max = x;
  } else {
    running_sum += exp_fn(x - running_max);
  }
}

}  // namespace wce
}  // namespace unet_ext
