// The per-block CPU kernels of weighted_cross_entropy, torch-free: included (per instruction set,
// inside UNET_CPU_ISA's namespace, after vec_math.h) by weighted_cross_entropy_kernel.h, and by
// dev/loss_cpu.cpp, which times this very code and its variants (dev/README.md). The tunables
// (kMaxBlock, kMaxBuffer) and the logsumexp variant (block_logsumexp) are one line each here:
// that is where a dev/ winner is promoted.
#ifndef UNET_CPU_ISA
#error "define UNET_CPU_ISA before including weighted_cross_entropy_block.h"
#endif

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../weighted_cross_entropy.h"

namespace unet_ext {
namespace wce {
namespace UNET_CPU_ISA {

namespace vm = ::unet_ext::cpu::UNET_CPU_ISA;

// Per-block scratch, on the stack (no allocation per task). kMaxBlock bounds B; the logits
// buffer holds C * B values with C * B <= kMaxBuffer (block_pixels keeps to that).
constexpr int64_t kMaxBlock = 256;
constexpr int64_t kMaxBuffer = 16384;

// Pixels per block: up to kMaxBlock, fewer for many classes so the (C, B) buffer stays in L2.
inline int64_t block_pixels(int64_t classes, int64_t max_block = kMaxBlock) {
  const int64_t b = std::clamp<int64_t>(kMaxBuffer / classes, 1, max_block);
  return b >= 8 ? b - b % 8 : b;
}

// Grain in blocks so that one parallel task covers at least ~32K logits.
inline int64_t grain_blocks(int64_t classes, int64_t block) {
  return std::max<int64_t>(1, 32768 / (classes * block));
}

// buf[c][j] = logits[n, c, s0 + j] as acc_t, rows `block` apart.
template <typename scalar_t, typename acc_t>
void gather_logits(const Geometry& g, const scalar_t* logits, int64_t n, int64_t s0, int64_t len,
                   int64_t block, acc_t* buf) {
  for (int64_t c = 0; c < g.classes; ++c) {
    const scalar_t* src = logits + g.logit_offset(n, c, s0);
    acc_t* row = buf + c * block;
    if (g.logits.s == 1) {
      for (int64_t j = 0; j < len; ++j) row[j] = static_cast<acc_t>(src[j]);
    } else {
      for (int64_t j = 0; j < len; ++j) row[j] = static_cast<acc_t>(src[j * g.logits.s]);
    }
  }
}

// The (C, B) logits buffer: on the stack, or on the heap for more than kMaxBuffer classes.
template <typename acc_t>
struct LogitsBuffer {
  explicit LogitsBuffer(int64_t size) {
    if (size > kMaxBuffer) heap.resize(size);
  }
  acc_t* data() { return heap.empty() ? stack : heap.data(); }
  acc_t stack[kMaxBuffer];
  std::vector<acc_t> heap;
};

// Class index of each pixel as int32 (so the per-class selects vectorise): the class, or
// kIgnored, or kBad for an out-of-range target. Returns whether any target was bad.
constexpr int32_t kIgnored = -1, kBad = -2;
inline bool load_classes(const Geometry& g, const int64_t* target, int64_t n, int64_t s0,
                         int64_t len, int32_t* cls, int64_t* first_bad) {
  const int64_t* src = target + n * g.target_n + s0 * g.target_s;
  const int64_t step = g.target_s, ignore_index = g.ignore_index, classes = g.classes;
  // Branch-free with an OR-reduced flag, so it vectorises; the bad value is looked up after.
  int32_t any_bad = 0;
  auto classify = [&](int64_t j, int64_t t) {
    const bool ignored = is_ignored(t, ignore_index);
    const bool valid = in_range(t, classes);
    cls[j] = ignored ? kIgnored : (valid ? static_cast<int32_t>(t) : kBad);
    any_bad |= static_cast<int32_t>(!ignored && !valid);
  };
  if (step == 1) {
    for (int64_t j = 0; j < len; ++j) classify(j, src[j]);
  } else {
    for (int64_t j = 0; j < len; ++j) classify(j, src[j * step]);
  }
  if (!any_bad) return false;
  for (int64_t j = 0; j < len; ++j) {
    if (cls[j] == kBad) {
      *first_bad = src[j * step];
      break;
    }
  }
  return true;
}

// lse[j] = logsumexp over classes of buf[:, j] (row c at buf + c * block). Variants (dev/loss.py
// times each; dev/loss_cpu.cpp's v2 and v3):
// two passes: max over classes, then the sum of exp(x - max): one exp per logit.
template <typename acc_t, int64_t kMax = kMaxBlock>
void block_logsumexp_two_pass(int64_t classes, int64_t len, int64_t block, const acc_t* buf, acc_t* lse) {
  acc_t mx[kMax], sum[kMax];
  for (int64_t j = 0; j < len; ++j) mx[j] = buf[j];
  for (int64_t c = 1; c < classes; ++c) {
    const acc_t* row = buf + c * block;
    // NaN wins, as in torch's logsumexp.
    for (int64_t j = 0; j < len; ++j) {
      const acc_t current = mx[j], candidate = row[j];
      mx[j] = (candidate > current || candidate != candidate) ? candidate : current;
    }
  }
  for (int64_t j = 0; j < len; ++j) sum[j] = acc_t(0);
  for (int64_t c = 0; c < classes; ++c) {
    const acc_t* row = buf + c * block;
    for (int64_t j = 0; j < len; ++j) sum[j] += vm::vexp(row[j] - mx[j]);
  }
  for (int64_t j = 0; j < len; ++j) lse[j] = mx[j] + vm::vlog(sum[j]);
}

// online: one pass over the rows, rescaling the running sum when the max grows (two exps per
// logit, half the loads): the CUDA kernels' recurrence, branch-free.
template <typename acc_t, int64_t kMax = kMaxBlock>
void block_logsumexp_online(int64_t classes, int64_t len, int64_t block, const acc_t* buf, acc_t* lse) {
  acc_t mx[kMax], sum[kMax];
  for (int64_t j = 0; j < len; ++j) {
    mx[j] = buf[j];
    sum[j] = acc_t(1);
  }
  for (int64_t c = 1; c < classes; ++c) {
    const acc_t* row = buf + c * block;
    for (int64_t j = 0; j < len; ++j) {
      const acc_t current = mx[j], x = row[j];
      const acc_t next = (x > current || x != x) ? x : current;
      sum[j] = sum[j] * vm::vexp(current - next) + vm::vexp(x - next);
      mx[j] = next;
    }
  }
  for (int64_t j = 0; j < len; ++j) lse[j] = mx[j] + vm::vlog(sum[j]);
}

// The library's choice. Promoting another variant is this one line.
template <typename acc_t, int64_t kMax = kMaxBlock>
inline void block_logsumexp(int64_t classes, int64_t len, int64_t block, const acc_t* buf, acc_t* lse) {
  block_logsumexp_two_pass<acc_t, kMax>(classes, len, block, buf, lse);
}

// Per-pixel factor w * class_weight[t] (0 for ignored or bad pixels) and, if picked is given,
// the target's logit.
template <typename acc_t>
void block_weights(const Geometry& g, const acc_t* weight_map, const acc_t* class_weight,
                   int64_t n, int64_t s0, int64_t len, int64_t block, const int32_t* cls,
                   const acc_t* buf, acc_t* factor, acc_t* class_factor, acc_t* picked) {
  for (int64_t j = 0; j < len; ++j) class_factor[j] = cls[j] >= 0 ? acc_t(1) : acc_t(0);
  if (class_weight) {
    for (int64_t j = 0; j < len; ++j) {  // unconditional (clamped) gather, then select
      const int32_t k = cls[j] >= 0 ? cls[j] : 0;
      const acc_t cw = class_weight[k];
      class_factor[j] = cls[j] >= 0 ? cw : acc_t(0);
    }
  }
  // Select the target's logit class by class: branch-free, so it vectorises (C is small in U-Net).
  // The backward needs no picked logit (picked == nullptr).
  if (picked) std::fill(picked, picked + len, acc_t(0));
  for (int32_t c = 0; c < g.classes && picked; ++c) {  // int32 c: an int64 compare would not vectorise
    const acc_t* row = buf + c * block;
    for (int64_t j = 0; j < len; ++j) {
      // Both loads before the select: GCC turns `p = cond ? v : p` into a scalar masked store.
      const acc_t current = picked[j], candidate = row[j];
      picked[j] = cls[j] == c ? candidate : current;
    }
  }
  if (weight_map) {
    const acc_t* w = weight_map + n * g.weight_n + s0 * g.weight_s;
    if (g.weight_s == 1) {
      for (int64_t j = 0; j < len; ++j) factor[j] = class_factor[j] * w[j];
    } else {
      for (int64_t j = 0; j < len; ++j) factor[j] = class_factor[j] * w[j * g.weight_s];
    }
  } else {
    for (int64_t j = 0; j < len; ++j) factor[j] = class_factor[j];
  }
}

// Sum in double over kLanes independent accumulators, added in a fixed order at the end: a
// single accumulator is a serial chain of dependent adds (the compiler may not reorder them),
// which cost more than the rest of the forward.
template <typename acc_t>
double sum_in_lanes(const acc_t* values, int64_t len) {
  constexpr int64_t kLanes = 8;
  double lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) lanes[k] += static_cast<double>(values[j + k]);
  }
  for (; j < len; ++j) lanes[0] += static_cast<double>(values[j]);
  double total = 0.0;
  for (int64_t k = 0; k < kLanes; ++k) total += lanes[k];
  return total;
}

// The forward of one block: lse[0, len) written, each pixel's loss (0 where ignored) into loss,
// and the block's sums of loss and of class factors (the mean's denominator) returned. buf's rows
// are `block` apart (a gathered (C, B) buffer, or the logits in place); Logsumexp: a variant above.
template <typename acc_t, int64_t kMax = kMaxBlock,
          void (*Logsumexp)(int64_t, int64_t, int64_t, const acc_t*, acc_t*) = block_logsumexp<acc_t, kMax>>
void forward_block(const Geometry& g, const acc_t* weight_map, const acc_t* class_weight, int64_t n,
                   int64_t s0, int64_t len, int64_t block, const int32_t* cls, const acc_t* buf,
                   acc_t* lse, acc_t* loss, double* loss_sum, double* weight_sum) {
  acc_t factor[kMax], class_factor[kMax];
  Logsumexp(g.classes, len, block, buf, lse);
  block_weights(g, weight_map, class_weight, n, s0, len, block, cls, buf, factor, class_factor, loss);
  // Separate simple loops: fused, GCC's AVX-512 if-conversion gives up and goes scalar.
  for (int64_t j = 0; j < len; ++j) {
    // factor is 0 for ignored pixels; the select keeps a NaN/inf logit there from leaking.
    const acc_t value = factor[j] * (lse[j] - loss[j]);  // loss holds the picked logit here
    loss[j] = factor[j] != acc_t(0) ? value : acc_t(0);
  }
  *loss_sum = sum_in_lanes(loss, len);
  *weight_sum = sum_in_lanes(class_factor, len);
}

}  // namespace UNET_CPU_ISA
}  // namespace wce
}  // namespace unet_ext
