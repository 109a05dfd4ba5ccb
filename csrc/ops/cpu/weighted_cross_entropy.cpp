// weighted_cross_entropy on the CPU. Pixels are processed in blocks of B (one sample each):
// the block's logits are gathered once into a (C, B) opmath buffer, then max, sum of exp and
// per-pixel losses run as unit-stride loops the compiler vectorises (vec_math.h). Block sums
// are kept per block and added in order, so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "../common/dispatch.h"
#include "../weighted_cross_entropy_host.h"
#include "vec_math.h"

namespace unet_ext {
namespace wce {
namespace {

// Pixels per block: up to 256, fewer for many classes so the (C, B) buffer stays in L2.
int64_t block_pixels(int64_t classes) {
  const int64_t b = std::clamp<int64_t>(16384 / classes, 8, 256);
  return b - b % 8;
}

// Grain in blocks so that one parallel task covers at least ~32K logits.
int64_t grain_blocks(int64_t classes, int64_t block) {
  return std::max<int64_t>(1, 32768 / (classes * block));
}

// First out-of-range target seen by any thread (reported after the parallel region).
struct BadTarget {
  std::atomic<bool> seen{false};
  int64_t value = 0;
  void record(int64_t t) {
    bool expected = false;
    if (seen.compare_exchange_strong(expected, true)) value = t;
  }
  void raise_if_seen(const char* op, const Geometry& g) const {
    TORCH_CHECK(!seen.load(), op, ": target value ", value, " is out of range for ", g.classes,
                " classes (expected 0 <= target < ", g.classes, ", or ignore_index=",
                g.ignore_index, ")");
  }
};

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

// lse[j] = logsumexp over classes of buf[:, j], two passes (max, then sum of exp).
template <typename acc_t>
void block_logsumexp(int64_t classes, int64_t len, int64_t block, const acc_t* buf, acc_t* lse) {
  acc_t* mx = lse;  // lse holds the running max first
  for (int64_t j = 0; j < len; ++j) mx[j] = buf[j];
  for (int64_t c = 1; c < classes; ++c) {
    const acc_t* row = buf + c * block;
    for (int64_t j = 0; j < len; ++j) mx[j] = row[j] > mx[j] || row[j] != row[j] ? row[j] : mx[j];
  }
  acc_t sum[256];
  for (int64_t j = 0; j < len; ++j) sum[j] = acc_t(0);
  for (int64_t c = 0; c < classes; ++c) {
    const acc_t* row = buf + c * block;
    for (int64_t j = 0; j < len; ++j) sum[j] += cpu::vexp(row[j] - mx[j]);
  }
  for (int64_t j = 0; j < len; ++j) lse[j] = mx[j] + cpu::vlog(sum[j]);
}

template <typename scalar_t>
void forward_kernel(const Prepared& p, ForwardOutputs& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry g = p.geometry;
  const int64_t block = block_pixels(g.classes);
  const int64_t blocks_per_sample = (g.pixels + block - 1) / block;
  const int64_t num_blocks = g.batch * blocks_per_sample;
  const scalar_t* logits = p.logits.const_data_ptr<scalar_t>();
  const int64_t* target = p.target.const_data_ptr<int64_t>();
  const acc_t* weight_map = g.has_weight_map ? p.weight_map.const_data_ptr<acc_t>() : nullptr;
  const acc_t* class_weight = g.has_class_weight ? p.class_weight.const_data_ptr<acc_t>() : nullptr;
  scalar_t* loss_map = g.reduction == kNone ? out.loss.mutable_data_ptr<scalar_t>() : nullptr;
  acc_t* lse_out = out.logsumexp.mutable_data_ptr<acc_t>();
  std::vector<double> block_loss(num_blocks, 0.0), block_weight(num_blocks, 0.0);
  BadTarget bad;

  at::parallel_for(0, num_blocks, grain_blocks(g.classes, block), [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> buf(g.classes * block);
    acc_t lse[256];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b / blocks_per_sample, s0 = (b % blocks_per_sample) * block;
      const int64_t len = std::min(block, g.pixels - s0);
      gather_logits(g, logits, n, s0, len, block, buf.data());
      block_logsumexp(g.classes, len, block, buf.data(), lse);
      double loss_sum = 0.0, weight_sum = 0.0;
      for (int64_t j = 0; j < len; ++j) {
        const int64_t s = s0 + j;
        const int64_t t = target[n * g.target_n + s * g.target_s];
        acc_t loss = acc_t(0);
        if (!is_ignored(t, g.ignore_index)) {
          if (!in_range(t, g.classes)) {
            bad.record(t);
          } else {
            const acc_t cw = class_weight ? class_weight[t] : acc_t(1);
            const acc_t w = weight_map ? weight_map[n * g.weight_n + s * g.weight_s] : acc_t(1);
            loss = w * cw * (lse[j] - buf[t * block + j]);
            weight_sum += cw;
          }
        }
        loss_sum += loss;
        if (loss_map) loss_map[n * g.pixels + s] = static_cast<scalar_t>(loss);
        lse_out[n * g.pixels + s] = lse[j];
      }
      block_loss[b] = loss_sum;
      block_weight[b] = weight_sum;
    }
  });
  bad.raise_if_seen("unet_ext.weighted_cross_entropy", g);

  double total_loss = 0.0, total_weight = 0.0;
  for (int64_t b = 0; b < num_blocks; ++b) {
    total_loss += block_loss[b];
    total_weight += block_weight[b];
  }
  out.total_weight.fill_(total_weight);
  if (g.reduction == kSum) out.loss.fill_(total_loss);
  if (g.reduction == kMean) out.loss.fill_(total_loss / total_weight);
}

template <typename scalar_t>
void backward_kernel(const Prepared& p, const at::Tensor& grad_loss, const at::Tensor& logsumexp,
                     const at::Tensor& total_weight, at::Tensor& grad_logits) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry g = p.geometry;
  const int64_t block = block_pixels(g.classes);
  const int64_t blocks_per_sample = (g.pixels + block - 1) / block;
  const int64_t num_blocks = g.batch * blocks_per_sample;
  const scalar_t* logits = p.logits.const_data_ptr<scalar_t>();
  const int64_t* target = p.target.const_data_ptr<int64_t>();
  const acc_t* weight_map = g.has_weight_map ? p.weight_map.const_data_ptr<acc_t>() : nullptr;
  const acc_t* class_weight = g.has_class_weight ? p.class_weight.const_data_ptr<acc_t>() : nullptr;
  const acc_t* lse_in = logsumexp.const_data_ptr<acc_t>();
  const scalar_t* grad_map = g.reduction == kNone ? grad_loss.const_data_ptr<scalar_t>() : nullptr;
  acc_t grad_scalar = acc_t(0);
  if (g.reduction != kNone) {
    grad_scalar = grad_loss.item<acc_t>();
    if (g.reduction == kMean) grad_scalar /= total_weight.item<acc_t>();
  }
  scalar_t* dst = grad_logits.mutable_data_ptr<scalar_t>();
  const PixelStrides gs = g.grad_logits;
  BadTarget bad;

  at::parallel_for(0, num_blocks, grain_blocks(g.classes, block), [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> buf(g.classes * block);
    acc_t coef[256], lse[256], row_out[256];
    int64_t tgt[256];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b / blocks_per_sample, s0 = (b % blocks_per_sample) * block;
      const int64_t len = std::min(block, g.pixels - s0);
      gather_logits(g, logits, n, s0, len, block, buf.data());
      for (int64_t j = 0; j < len; ++j) {
        const int64_t s = s0 + j;
        const int64_t t = target[n * g.target_n + s * g.target_s];
        lse[j] = lse_in[n * g.pixels + s];
        coef[j] = acc_t(0);
        tgt[j] = -1;
        if (is_ignored(t, g.ignore_index)) continue;
        if (!in_range(t, g.classes)) {
          bad.record(t);
          continue;
        }
        const acc_t up = grad_map ? static_cast<acc_t>(grad_map[n * g.grad_n + s * g.grad_s]) : grad_scalar;
        const acc_t cw = class_weight ? class_weight[t] : acc_t(1);
        const acc_t w = weight_map ? weight_map[n * g.weight_n + s * g.weight_s] : acc_t(1);
        coef[j] = up * w * cw;
        tgt[j] = t;
      }
      // d loss / d logits[c] = coef * (softmax[c] - [c == target])
      for (int64_t c = 0; c < g.classes; ++c) {
        const acc_t* row = buf.data() + c * block;
        for (int64_t j = 0; j < len; ++j)
          row_out[j] = coef[j] * cpu::vexp(row[j] - lse[j]) - (tgt[j] == c ? coef[j] : acc_t(0));
        scalar_t* out = dst + n * gs.n + c * gs.c + s0 * gs.s;
        if (gs.s == 1) {
          for (int64_t j = 0; j < len; ++j) out[j] = static_cast<scalar_t>(row_out[j]);
        } else {
          for (int64_t j = 0; j < len; ++j) out[j * gs.s] = static_cast<scalar_t>(row_out[j]);
        }
      }
    }
  });
  bad.raise_if_seen("unet_ext._weighted_cross_entropy_backward", g);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight_map,
    const std::optional<at::Tensor>& class_weight, int64_t ignore_index, c10::string_view reduction) {
  Prepared p = prepare("unet_ext.weighted_cross_entropy", logits, target, weight_map, class_weight,
                       ignore_index, reduction);
  ForwardOutputs out = allocate_forward(p);
  UNET_DISPATCH_FLOATING_TYPES(p.logits.scalar_type(), "weighted_cross_entropy_cpu",
                               [&] { forward_kernel<scalar_t>(p, out); });
  return {out.loss, out.logsumexp, out.total_weight};
}

at::Tensor backward_cpu(const at::Tensor& grad_loss, const at::Tensor& logits,
                        const at::Tensor& target, const std::optional<at::Tensor>& weight_map,
                        const std::optional<at::Tensor>& class_weight, const at::Tensor& logsumexp,
                        const at::Tensor& total_weight, int64_t ignore_index,
                        c10::string_view reduction) {
  Prepared p = prepare("unet_ext._weighted_cross_entropy_backward", logits, target, weight_map,
                       class_weight, ignore_index, reduction);
  at::Tensor grad = grad_loss.to(logits.scalar_type());
  at::Tensor grad_logits = prepare_backward(p, grad, logsumexp, total_weight);
  if (grad_logits.numel() == 0) return grad_logits;
  UNET_DISPATCH_FLOATING_TYPES(p.logits.scalar_type(), "weighted_cross_entropy_backward_cpu", [&] {
    backward_kernel<scalar_t>(p, grad, logsumexp, total_weight, grad_logits);
  });
  return grad_logits;
}

}  // namespace
}  // namespace wce
}  // namespace unet_ext

TORCH_LIBRARY_IMPL(unet_ext, CPU, m) {
  m.impl("_weighted_cross_entropy_forward", &unet_ext::wce::forward_cpu);
  m.impl("_weighted_cross_entropy_backward", &unet_ext::wce::backward_cpu);
}
