// weighted_cross_entropy CPU kernels, compiled once per instruction set: included by
// weighted_cross_entropy_{baseline,avx2,avx512}.cpp, each defining UNET_CPU_ISA (the namespace,
// which keeps the builds apart at link time) under its own `#pragma GCC target`.
// Pixels are processed in blocks of B (one sample each): the block's logits are gathered once
// into a (C, B) opmath buffer, then max, sum of exp and per-pixel losses run as unit-stride
// loops the compiler vectorises (vec_math.h). Block sums are kept per block and added in order,
// so results do not depend on the thread count. The per-block code is
// weighted_cross_entropy_block.h; this file adds the threads, the dtypes and the checks.
#ifndef UNET_CPU_ISA
#error "define UNET_CPU_ISA before including weighted_cross_entropy_kernel.h"
#endif

#include "weighted_cross_entropy_block.h"  // the per-block kernels (torch-free, shared with dev/)

namespace unet_ext {
namespace wce {
namespace UNET_CPU_ISA {

namespace vm = ::unet_ext::cpu::UNET_CPU_ISA;

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


// What both passes read: the block decomposition and the input pointers.
template <typename scalar_t>
struct KernelInputs {
  using acc_t = at::opmath_type<scalar_t>;
  explicit KernelInputs(const Prepared& p)
      : g(p.geometry),
        block(block_pixels(g.classes)),
        blocks_per_sample((g.pixels + block - 1) / block),
        num_blocks(g.batch * blocks_per_sample),
        logits(p.logits.const_data_ptr<scalar_t>()),
        target(p.target.const_data_ptr<int64_t>()),
        weight_map(g.has_weight_map ? p.weight_map.const_data_ptr<acc_t>() : nullptr),
        class_weight(g.has_class_weight ? p.class_weight.const_data_ptr<acc_t>() : nullptr) {}
  const Geometry g;
  const int64_t block, blocks_per_sample, num_blocks;
  const scalar_t* logits;
  const int64_t* target;
  const acc_t* weight_map;
  const acc_t* class_weight;
};

// Runs body(b, n, s0, len, cls, buf) for every block of pixels, blocks in parallel: the block's
// classes loaded into cls (bad targets recorded in `bad`) and its logits gathered into buf
// [classes][block] as acc_t; b is the block's index, pixels s0 .. s0 + len of sample n.
template <typename scalar_t, typename Body>
void for_each_block(const KernelInputs<scalar_t>& in, BadTarget& bad, const Body& body) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry& g = in.g;
  at::parallel_for(0, in.num_blocks, grain_blocks(g.classes, in.block), [&](int64_t b0, int64_t b1) {
    LogitsBuffer<acc_t> scratch(g.classes * in.block);
    int32_t cls[kMaxBlock];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b / in.blocks_per_sample, s0 = (b % in.blocks_per_sample) * in.block;
      const int64_t len = std::min(in.block, g.pixels - s0);
      int64_t bad_value = 0;
      if (load_classes(g, in.target, n, s0, len, cls, &bad_value)) bad.record(bad_value);
      gather_logits(g, in.logits, n, s0, len, in.block, scratch.data());
      body(b, n, s0, len, static_cast<const int32_t*>(cls), scratch.data());
    }
  });
}

template <typename scalar_t>
void forward_kernel(const Prepared& p, ForwardOutputs& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const KernelInputs<scalar_t> in(p);
  const Geometry& g = in.g;
  acc_t* loss_map = g.reduction == kNone ? out.loss.mutable_data_ptr<acc_t>() : nullptr;
  acc_t* lse_out = out.logsumexp.mutable_data_ptr<acc_t>();
  std::vector<double> block_loss(in.num_blocks, 0.0), block_weight(in.num_blocks, 0.0);
  BadTarget bad;

  for_each_block(in, bad, [&](int64_t b, int64_t n, int64_t s0, int64_t len, const int32_t* cls, acc_t* buf) {
    // The per-pixel losses go straight into the (opmath) loss map, or onto the stack.
    acc_t stack_loss[kMaxBlock];
    acc_t* loss = loss_map ? loss_map + n * g.pixels + s0 : stack_loss;
    forward_block(g, in.weight_map, in.class_weight, n, s0, len, in.block, cls, buf, lse_out + n * g.pixels + s0,
                  loss, &block_loss[b], &block_weight[b]);
  });
  bad.raise_if_seen("unet_ext.weighted_cross_entropy", g);

  double total_loss = 0.0, total_weight = 0.0;
  for (int64_t b = 0; b < in.num_blocks; ++b) {
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
  const KernelInputs<scalar_t> in(p);
  const Geometry& g = in.g;
  const acc_t* lse_in = logsumexp.const_data_ptr<acc_t>();
  const acc_t* grad_map = g.reduction == kNone ? grad_loss.const_data_ptr<acc_t>() : nullptr;
  acc_t grad_scalar = acc_t(0);
  if (g.reduction != kNone) {
    grad_scalar = grad_loss.item<acc_t>();
    if (g.reduction == kMean) grad_scalar /= total_weight.item<acc_t>();
  }
  scalar_t* dst = grad_logits.mutable_data_ptr<scalar_t>();
  const PixelStrides gs = g.grad_logits;
  BadTarget bad;

  for_each_block(in, bad, [&](int64_t, int64_t n, int64_t s0, int64_t len, const int32_t* cls, acc_t* buf) {
    acc_t coef[kMaxBlock], class_factor[kMaxBlock], row_out[kMaxBlock];
    block_weights(g, in.weight_map, in.class_weight, n, s0, len, in.block, cls, buf, coef, class_factor,
                  static_cast<acc_t*>(nullptr));
    if (grad_map) {
      const acc_t* up = grad_map + n * g.grad_n + s0 * g.grad_s;
      for (int64_t j = 0; j < len; ++j) coef[j] *= up[j * g.grad_s];
    } else {
      for (int64_t j = 0; j < len; ++j) coef[j] *= grad_scalar;
    }
    // An ignored pixel's gradient is 0, as stock's: not 0 * inf = NaN when every pixel is ignored
    // ('mean' divides by a total weight of 0) or the upstream gradient there is not finite.
    for (int64_t j = 0; j < len; ++j) coef[j] = cls[j] == kIgnored ? acc_t(0) : coef[j];
    const acc_t* lse = lse_in + n * g.pixels + s0;
    // d loss / d logits[c] = coef * (softmax[c] - [c == target]); coef is 0 where ignored
    // (a NaN logit there gives NaN, as in stock PyTorch's log_softmax backward).
    for (int32_t c = 0; c < g.classes; ++c) {
      const acc_t* row = buf + c * in.block;
      scalar_t* out = dst + n * gs.n + c * gs.c + s0 * gs.s;
      // Unit stride in the gradient's own dtype: written in place, no staging row.
      acc_t* direct = (gs.s == 1 && std::is_same_v<scalar_t, acc_t>) ? reinterpret_cast<acc_t*>(out) : row_out;
      for (int64_t j = 0; j < len; ++j) {
        // Arithmetic, not selects, so every lane computes (GCC's masked form does not vectorise).
        const acc_t onehot = cls[j] == c ? acc_t(1) : acc_t(0);
        direct[j] = coef[j] * (vm::vexp(row[j] - lse[j]) - onehot);
      }
      if (direct != row_out) continue;
      if (gs.s == 1) {
        for (int64_t j = 0; j < len; ++j) out[j] = static_cast<scalar_t>(row_out[j]);
      } else {
        for (int64_t j = 0; j < len; ++j) out[j * gs.s] = static_cast<scalar_t>(row_out[j]);
      }
    }
  });
  bad.raise_if_seen("unet_ext._weighted_cross_entropy_backward", g);
}

void forward(const Prepared& p, ForwardOutputs& out) {
  UNET_DISPATCH_FLOATING_TYPES(p.logits.scalar_type(), "weighted_cross_entropy_cpu",
                               [&] { forward_kernel<scalar_t>(p, out); });
}

void backward(const Prepared& p, const at::Tensor& grad_loss, const at::Tensor& logsumexp,
              const at::Tensor& total_weight, at::Tensor& grad_logits) {
  UNET_DISPATCH_FLOATING_TYPES(p.logits.scalar_type(), "weighted_cross_entropy_backward_cpu", [&] {
    backward_kernel<scalar_t>(p, grad_loss, logsumexp, total_weight, grad_logits);
  });
}

}  // namespace UNET_CPU_ISA
}  // namespace wce
}  // namespace unet_ext
