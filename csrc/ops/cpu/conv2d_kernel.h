// The CPU convolution kernels of conv2d_relu / conv2d_bias (cpu/conv2d_relu.cpp) and of the
// two-source conv2d_relu_concat (cpu/conv2d_relu_concat.cpp): blocked implicit GEMM. A task takes
// a block of output rows of one image (and, for wide layers, a block of output channels). Each
// kernel tap is one GEMM (oneDNN's brgemm for float) on the block's input window read in place or
// padded into a per-thread buffer; with few input channels or large weights (the deep layers) it
// is one long-K GEMM over the shifted windows instead, with the weights as stored
// (use_shifted_rows). Bias + ReLU (+ the cast) are applied while the product is in cache.
// Backward: dgrad is the same convolution of the masked gradient (zero where output <= 0, applied
// while loading the window) with the flipped weight; wgrad and the bias grad are summed in a
// fixed order (per-part partials, or input-channel blocks owned by one task). A source is
// conv2d_relu.h's ChannelParts: one NCHW tensor, or the skip's crop window then up.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/version.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <type_traits>
#include <vector>

#include "../common/dispatch.h"
#include "../conv_host.h"
#include "cpu_isa.h"
#include "gemm.h"
#include "huge_pages.h"
#include "partials.h"

namespace unet_ext {
namespace conv {
namespace cpu_kernel {

using cpu::empty_huge;

// A block is `rows` output rows of one image. Its source is the (padded) input window
// [C_src][rows + kh - 1][width] with width = W_out + kw - 1, so that every tap (ky, kx) of the
// kernel is a plain GEMM operand: the window shifted by ky * width + kx, read as
// [C_src, rows * width - (kw - 1)] with the channel stride as leading dimension. The product is
// computed "wide" (width columns per row); the kw - 1 extra columns are never read back. So
// there is no im2col: a valid convolution of a contiguous float input reads the input in
// place, and otherwise the window is one padded (and, for dgrad, masked) copy.
struct Block {
  int64_t n, oh0, rows;
};

struct BlockPlan {
  int64_t rows, blocks_per_image, width;
  int64_t window_rows(int64_t block_rows, const ConvGeometry& g) const { return block_rows + g.kernel_h - 1; }
  Block block(int64_t b, const ConvGeometry& g) const {
    const int64_t oh0 = (b % blocks_per_image) * rows;
    return {b / blocks_per_image, oh0, std::min(rows, g.out_h - oh0)};
  }
};

// Up to this many input channels, one GEMM over shifted rows (see shifted_rows) beats a GEMM per tap.
constexpr int64_t kFewChannels = 8;
constexpr int64_t kMaxPartialElements = int64_t{1} << 22;  // wgrad partials, all parts (one per thread)

// One GEMM over shifted rows (K = C_in*kh*kw, see shifted_rows) instead of one GEMM per tap: with
// few input channels (K = C_in is too short), and where the weights outweigh the image (U-Net's
// deep layers): the weights are then used as they are stored, [C_out][C_in*kh*kw], with no
// per-call repacking, in one long-K GEMM.
inline bool use_shifted_rows(const ConvGeometry& g) {
  return g.in_channels <= kFewChannels || g.kernel_h * g.kernel_w * g.out_channels > 2 * g.in_h * g.in_w;
}

// Rows per block: window plus product near kBlockBytes (half of a 1 MiB L2), at least one row.
constexpr int64_t kBlockBytes = int64_t{1} << 19;
constexpr int64_t kMinColumns = 512, kMaxChannelBlock = 256;
inline BlockPlan plan_blocks(const ConvGeometry& g, int64_t element_size) {
  BlockPlan plan;
  plan.width = g.out_w + g.kernel_w - 1;
  // Output channels are split over tasks when they are many (see convolve), so count at most
  // kMaxChannelBlock of them; and keep at least kMinColumns columns, or the deep layers' large
  // weights would be streamed once per handful of pixels.
  int64_t per_row = (g.in_channels + std::min(g.out_channels, kMaxChannelBlock)) * plan.width * element_size;
  if (use_shifted_rows(g)) per_row += g.taps() * plan.width * element_size;
  const int64_t min_rows = (kMinColumns + plan.width - 1) / plan.width;
  plan.rows = std::clamp<int64_t>(std::max(kBlockBytes / std::max<int64_t>(1, per_row), min_rows), 1,
                                  std::max<int64_t>(1, g.out_h));
  plan.blocks_per_image = (g.out_h + plan.rows - 1) / plan.rows;
  plan.rows = (g.out_h + plan.blocks_per_image - 1) / plan.blocks_per_image;  // equal blocks: balanced tasks
  plan.blocks_per_image = (g.out_h + plan.rows - 1) / plan.rows;
  return plan;
}

// A convolution's source: one dense NCHW tensor, or conv2d_relu_concat's cropped skip + up
// (conv2d_relu.h). A mask (dgrad's forward output) has the source's shape and parts.
template <typename scalar_t>
using Source = ChannelParts<const scalar_t>;

// Whether the window can be read in place: no padding, no mask, float input (GEMM dtype).
template <typename scalar_t>
bool window_in_place(const ConvGeometry& g, const void* mask) {
  return g.pad_h == 0 && g.pad_w == 0 && mask == nullptr &&
         std::is_same_v<scalar_t, at::opmath_type<scalar_t>>;
}

// ... and whether channels [c_begin, c_end) of the source allow it: one part (one channel
// stride for the GEMMs) whose rows are exactly the window's width (no crop in width).
template <typename scalar_t>
bool window_in_place(const ConvGeometry& g, const void* mask, const Source<scalar_t>& src,
                     int64_t c_begin, int64_t c_end) {
  return window_in_place<scalar_t>(g, mask) &&
         (c_end <= c_begin || (src.part(c_begin) == src.part(c_end - 1) && src.row_stride(c_begin) == g.in_w));
}

// window[c - c_begin][i][x] = src[c][oh0 - pad_h + i][x - pad_w] for c in [c_begin, c_end)
// (zero where mask <= 0), 0 outside the input.
template <typename scalar_t, typename acc_t>
void load_window(const ConvGeometry& g, const BlockPlan& plan, const Source<scalar_t>& src,
                 const Source<scalar_t>* mask, const Block& blk, int64_t c_begin, int64_t c_end, acc_t* window) {
  const int64_t window_rows = plan.window_rows(blk.rows, g), width = plan.width;
  const int64_t lo = std::clamp<int64_t>(g.pad_w, 0, width);
  const int64_t hi = std::clamp<int64_t>(g.in_w + g.pad_w, lo, width);
  for (int64_t c = c_begin; c < c_end; ++c) {
    for (int64_t i = 0; i < window_rows; ++i) {
      acc_t* d = window + ((c - c_begin) * window_rows + i) * width;
      const int64_t ih = blk.oh0 - g.pad_h + i;
      if (ih < 0 || ih >= g.in_h) {
        std::fill(d, d + width, acc_t(0));
        continue;
      }
      const scalar_t* s = src.at(blk.n, c, ih) - g.pad_w;
      std::fill(d, d + lo, acc_t(0));
      if (mask) {
        const scalar_t* m = mask->at(blk.n, c, ih) - g.pad_w;
        for (int64_t x = lo; x < hi; ++x) {
          // Both loads unconditional, so the select vectorises.
          const acc_t value = static_cast<acc_t>(s[x]), kept = static_cast<acc_t>(m[x]);
          d[x] = kept <= acc_t(0) ? acc_t(0) : value;  // NaN outputs pass, as in torch's ReLU backward
        }
      } else {
        for (int64_t x = lo; x < hi; ++x) d[x] = static_cast<acc_t>(s[x]);
      }
      std::fill(d + hi, d + width, acc_t(0));
    }
  }
}

// The window of a block (channels [c_begin, c_end)): in place, or loaded into `buffer`. Sets
// the channel stride.
template <typename scalar_t, typename acc_t>
const acc_t* block_window(const ConvGeometry& g, const BlockPlan& plan, const Source<scalar_t>& src,
                          const Source<scalar_t>* mask, const Block& blk, int64_t c_begin, int64_t c_end,
                          acc_t* buffer, int64_t& channel_stride) {
  if (window_in_place(g, mask, src, c_begin, c_end)) {
    channel_stride = src.plane[src.part(c_begin)];
    return reinterpret_cast<const acc_t*>(src.at(blk.n, c_begin, blk.oh0));
  }
  load_window(g, plan, src, mask, blk, c_begin, c_end, buffer);
  channel_stride = plan.window_rows(blk.rows, g) * plan.width;
  return buffer;
}

// rows[(c, ky, kx), columns]: the window shifted by each tap, as rows of one GEMM operand
// (contiguous copies; see use_shifted_rows).

template <typename acc_t>
void shifted_rows(const ConvGeometry& g, const BlockPlan& plan, const acc_t* win,
                  int64_t channel_stride, int64_t channels, int64_t columns, acc_t* rows) {
  for (int64_t c = 0; c < channels; ++c)
    for (int64_t ky = 0; ky < g.kernel_h; ++ky)
      for (int64_t kx = 0; kx < g.kernel_w; ++kx) {
        const acc_t* from = win + c * channel_stride + ky * plan.width + kx;
        std::copy(from, from + columns, rows + ((c * g.kernel_h + ky) * g.kernel_w + kx) * columns);
      }
}

// dst (N, C_out, H_out, W_out) = [relu](conv(src [masked]) + bias); dst's channels may live in
// two tensors too (conv2d_relu_concat's dgrad writes grad_skip's crop window and grad_up).
// weights (opmath): [C_out][C_in*kh*kw] as stored when use_shifted_rows(g), else taps
// [kh*kw][C_out][C_in].
template <typename scalar_t>
void convolve(const ConvGeometry& g, const Source<scalar_t>& src, const Source<scalar_t>* mask,
              const at::Tensor& taps, const at::Tensor& bias, bool relu, const ChannelParts<scalar_t>& dst) {
  using acc_t = at::opmath_type<scalar_t>;
  const BlockPlan plan = plan_blocks(g, sizeof(acc_t));
  const int64_t tap_size = g.out_channels * g.in_channels;
  const acc_t* bias_data = bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr;
  const acc_t* weights = taps.const_data_ptr<acc_t>();
  const bool in_place = window_in_place(g, mask, src, 0, g.in_channels);
  const bool shifted = use_shifted_rows(g);
  // Tasks are (block, output-channel block): the channels are split when the row blocks alone
  // cannot keep the threads busy (the deep layers: large weights, few pixels). A task's window
  // is reused by the next task of the same block.
  const int64_t row_tasks = g.batch * plan.blocks_per_image;
  const int64_t threads = at::get_num_threads();
  // Deep layers (one long-K GEMM per block) run their blocks in turn and let the BLAS use the
  // threads: its own partitioning of a big GEMM beats ours of few, large tasks.
  const bool blas_threads = shifted && g.in_channels > kFewChannels;
  int64_t co_block = g.out_channels;
  if (!blas_threads && row_tasks < 2 * threads && g.out_channels >= 32) {
    const int64_t split = std::min<int64_t>((2 * threads + row_tasks - 1) / row_tasks, g.out_channels / 16);
    co_block = ((g.out_channels + split - 1) / split + 15) / 16 * 16;
  }
  co_block = std::min(co_block, std::max<int64_t>(kMaxChannelBlock, (g.out_channels + 1) / 2 / 16 * 16));
  const int64_t co_blocks = (g.out_channels + co_block - 1) / co_block;
  const auto run_tasks = [&](int64_t t0, int64_t t1) {
    const int64_t wide = plan.rows * plan.width;
    acc_t* window = in_place ? nullptr : cpu::scratch<acc_t>(0, g.in_channels * plan.window_rows(plan.rows, g) * plan.width);
    acc_t* product = cpu::scratch<acc_t>(1, co_block * wide);
    acc_t* rows_buffer = shifted ? cpu::scratch<acc_t>(2, g.taps() * wide) : nullptr;
    int64_t loaded = -1;  // block whose window (and shifted rows) this thread holds
    const acc_t* win = nullptr;
    int64_t channel_stride = 0;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / co_blocks, co0 = (t % co_blocks) * co_block;
      const int64_t co_count = std::min(co_block, g.out_channels - co0);
      const Block blk = plan.block(b, g);
      const int64_t columns = blk.rows * plan.width - (g.kernel_w - 1), ld = blk.rows * plan.width;
      if (b != loaded) {
        win = block_window(g, plan, src, mask, blk, 0, g.in_channels, window, channel_stride);
        if (shifted) shifted_rows(g, plan, win, channel_stride, g.in_channels, columns, rows_buffer);
        loaded = b;
      }
      if (shifted) {
        // product[co, columns] = W[co, (c, ky, kx)] rows[(c, ky, kx), columns]
        cpu::gemm(co_count, columns, g.taps(), weights + co0 * g.taps(), g.taps(),
                  rows_buffer, columns, product, ld, false);
      }
      // product[co, columns] = sum over taps of W_tap[co, C_in] window_tap[C_in, columns]
      for (int64_t ky = 0; ky < g.kernel_h && !shifted; ++ky) {
        for (int64_t kx = 0; kx < g.kernel_w; ++kx) {
          const int64_t tap = ky * g.kernel_w + kx;
          cpu::gemm(co_count, columns, g.in_channels, weights + tap * tap_size + co0 * g.in_channels,
                    g.in_channels, win + ky * plan.width + kx, channel_stride, product, ld, tap > 0);
        }
      }
      for (int64_t k = 0; k < co_count; ++k) {
        const int64_t co = co0 + k;
        const acc_t shift = bias_data ? bias_data[co] : acc_t(0);
        scalar_t* d = dst.at(blk.n, co, blk.oh0);
        const int64_t pitch = dst.row_stride(co);
        for (int64_t r = 0; r < blk.rows; ++r) {
          const acc_t* row = product + k * ld + r * plan.width;
          scalar_t* out_row = d + r * pitch;
          if (relu) {
            // v < 0 ? 0 : v keeps NaN, as torch.relu does.
            for (int64_t i = 0; i < g.out_w; ++i) {
              const acc_t v = row[i] + shift;
              out_row[i] = static_cast<scalar_t>(v < acc_t(0) ? acc_t(0) : v);
            }
          } else {
            for (int64_t i = 0; i < g.out_w; ++i) out_row[i] = static_cast<scalar_t>(row[i] + shift);
          }
        }
      }
    }
    cpu::gemm_release();
  };
  if (blas_threads) {
    run_tasks(0, row_tasks * co_blocks);
  } else {
    at::parallel_for(0, row_tasks * co_blocks, 1, run_tasks);
  }
}

// The bias gradient's sums in kBiasLanes independent chains: lane l takes the terms i = l mod
// kBiasLanes of each run added (a run's tail from lane 0), the lanes are added in order at the end
// (bias_lanes_sum). One chain serialised the adds on their latency: 40% of the first layer's (1 ->
// 32 at 316) weight gradient. Shared by masked_gradient and conv_transpose2x2's backward.
constexpr int64_t kBiasLanes = 16;
template <typename acc_t, typename Term>
inline void add_bias_lanes(acc_t (&lanes)[kBiasLanes], int64_t n, const Term& term) {
  int64_t i = 0;
  for (; i + kBiasLanes <= n; i += kBiasLanes) {
    for (int64_t l = 0; l < kBiasLanes; ++l) lanes[l] += term(i + l);
  }
  for (int64_t l = 0; i < n; ++i, ++l) lanes[l] += term(i);
}
template <typename acc_t>
inline acc_t bias_lanes_sum(const acc_t (&lanes)[kBiasLanes]) {
  acc_t s = 0;
  for (int64_t l = 0; l < kBiasLanes; ++l) s += lanes[l];
  return s;
}

// masked_t[wide, C_out]: a block's gradient, zero where the forward output is <= 0 and in the
// extra (wide) columns, transposed for the wgrad GEMMs; bias_sum[co] += its column sums.
template <typename scalar_t, typename acc_t>
void masked_gradient(const ConvGeometry& g, const BlockPlan& plan, const scalar_t* grad_out,
                     const scalar_t* mask, const Block& blk, acc_t* masked, acc_t* masked_t,
                     acc_t* bias_sum) {
  const int64_t out_plane = g.out_h * g.out_w, out_image = g.out_channels * out_plane;
  const int64_t wide_block = blk.rows * plan.width;
  for (int64_t co = 0; co < g.out_channels; ++co) {
    acc_t lanes[kBiasLanes] = {};  // the bias sum, lane l over the columns i = l mod kBiasLanes of every row
    for (int64_t r = 0; r < blk.rows; ++r) {
      const int64_t offset = blk.n * out_image + co * out_plane + (blk.oh0 + r) * g.out_w;
      const scalar_t* gsrc = grad_out + offset;
      const scalar_t* msrc = mask ? mask + offset : nullptr;
      acc_t* mrow = masked + co * wide_block + r * plan.width;
      if (msrc) {
        for (int64_t i = 0; i < g.out_w; ++i) {
          const acc_t v = static_cast<acc_t>(gsrc[i]), mv = static_cast<acc_t>(msrc[i]);
          mrow[i] = mv <= acc_t(0) ? acc_t(0) : v;
        }
      } else {
        for (int64_t i = 0; i < g.out_w; ++i) mrow[i] = static_cast<acc_t>(gsrc[i]);
      }
      add_bias_lanes(lanes, g.out_w, [mrow](int64_t i) { return mrow[i]; });
      std::fill(mrow + g.out_w, mrow + plan.width, acc_t(0));
    }
    if (bias_sum) bias_sum[co] += bias_lanes_sum(lanes);
  }
  cpu::transpose(static_cast<const acc_t*>(masked), g.out_channels, wide_block, masked_t);
}

// grad_weight [C_out][C_in][kh][kw] and grad_bias [C_out] (opmath, zero on entry), from the
// input windows and the masked gradient (masked_t) of the forward's blocks. With more than a
// few input channels each task owns a block of input channels and walks all images and blocks
// in order (deterministic, no partial sums): one GEMM per tap, window_tap x masked_t, into
// taps-ordered sums [kh*kw][C_in][C_out]; or, where use_shifted_rows, one GEMM over the shifted
// rows into [(c, ky, kx)][C_out]. Small weights: per-part partials (one part of the blocks per
// thread) of the same GEMMs, added in part order. Either way the sums are transposed into
// grad_weight at the end.
template <typename scalar_t>
void weight_gradients(const ConvGeometry& g, const Source<scalar_t>& input, const scalar_t* grad_out,
                      const scalar_t* mask, at::Tensor& grad_weight, at::Tensor& grad_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  const BlockPlan plan = plan_blocks(g, sizeof(acc_t));
  const int64_t tap_size = g.in_channels * g.out_channels, taps = g.kernel_h * g.kernel_w;
  const int64_t threads = at::get_num_threads();
  const int64_t num_blocks = g.batch * plan.blocks_per_image, wide = plan.rows * plan.width;
  const bool in_place = window_in_place(g, nullptr, input, 0, g.in_channels);
  const bool shifted = use_shifted_rows(g);
  const auto acc_options = grad_weight.options();
  // [(c, ky, kx)][C_out] when shifted, else [kh*kw][C_in][C_out].
  at::Tensor sums = at::zeros({taps * tap_size}, acc_options);
  acc_t* dw = sums.mutable_data_ptr<acc_t>();
  acc_t* db = grad_bias.mutable_data_ptr<acc_t>();

  // Per-thread partial sums while they are small (they cost threads x weights of zeroing and
  // adding); the deep layers' weights (up to 37 MB) are split by input channel instead.
  const bool partials = threads * taps * tap_size <= kMaxPartialElements || g.in_channels <= kFewChannels;
  if (!partials) {
    const int64_t per_task = (g.in_channels + 2 * threads - 1) / (2 * threads);
    const int64_t ci_block = std::max<int64_t>(32, (per_task + 15) / 16 * 16);
    const int64_t ci_blocks = (g.in_channels + ci_block - 1) / ci_block;
    at::parallel_for(0, ci_blocks, 1, [&](int64_t c0, int64_t c1) {
      std::unique_ptr<acc_t[]> window(in_place ? nullptr : new acc_t[ci_block * plan.window_rows(plan.rows, g) * plan.width]);
      std::unique_ptr<acc_t[]> masked(new acc_t[g.out_channels * wide]);
      std::unique_ptr<acc_t[]> masked_t(new acc_t[wide * g.out_channels]);
      std::unique_ptr<acc_t[]> rows_buffer(shifted ? new acc_t[ci_block * taps * wide] : nullptr);
      for (int64_t cb = c0; cb < c1; ++cb) {
        const int64_t ci0 = cb * ci_block, ci_count = std::min(ci_block, g.in_channels - ci0);
        for (int64_t b = 0; b < num_blocks; ++b) {
          const Block blk = plan.block(b, g);
          int64_t channel_stride = 0;
          const acc_t* win = block_window(g, plan, input, static_cast<const Source<scalar_t>*>(nullptr), blk,
                                          ci0, ci0 + ci_count, window.get(), channel_stride);
          masked_gradient(g, plan, grad_out, mask, blk, masked.get(), masked_t.get(), cb == 0 ? db : nullptr);
          const int64_t columns = blk.rows * plan.width - (g.kernel_w - 1);
          if (shifted) {
            // dw[(ci0.., ky, kx), C_out] += rows[(c, ky, kx), columns] masked_t[columns, C_out]
            shifted_rows(g, plan, win, channel_stride, ci_count, columns, rows_buffer.get());
            cpu::gemm(ci_count * taps, g.out_channels, columns, rows_buffer.get(), columns,
                      masked_t.get(), g.out_channels, dw + ci0 * taps * g.out_channels,
                      g.out_channels, true);
            continue;
          }
          for (int64_t tap = 0; tap < taps; ++tap) {
            const int64_t ky = tap / g.kernel_w, kx = tap % g.kernel_w;
            // dw[tap][ci0.., C_out] += window_tap[ci0.., columns] masked_t[columns, C_out]
            cpu::gemm(ci_count, g.out_channels, columns, win + ky * plan.width + kx, channel_stride,
                      masked_t.get(), g.out_channels, dw + tap * tap_size + ci0 * g.out_channels,
                      g.out_channels, true);
          }
        }
      }
      cpu::gemm_release();
    });
  } else {
    // One partial per part (partials.h), whatever the size of the team that runs the parts.
    const int64_t parts = cpu::partial_count(num_blocks);
    at::Tensor weight_partials = at::zeros({parts, taps * tap_size}, acc_options);
    at::Tensor bias_partials = at::zeros({parts, g.out_channels}, acc_options);
    acc_t* weight_partial = weight_partials.mutable_data_ptr<acc_t>();  // rows in the layout of `sums`
    acc_t* bias_partial = bias_partials.mutable_data_ptr<acc_t>();
    at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
      std::unique_ptr<acc_t[]> window(in_place ? nullptr : new acc_t[g.in_channels * plan.window_rows(plan.rows, g) * plan.width]);
      std::unique_ptr<acc_t[]> masked(new acc_t[g.out_channels * wide]);
      std::unique_ptr<acc_t[]> masked_t(new acc_t[wide * g.out_channels]);
      std::unique_ptr<acc_t[]> rows_buffer(shifted ? new acc_t[g.taps() * wide] : nullptr);
      for (int64_t part = p0; part < p1; ++part) {
        acc_t* weight_sum = weight_partial + part * taps * tap_size;
        acc_t* bias_sum = bias_partial + part * g.out_channels;
        const int64_t b1 = cpu::part_begin(num_blocks, parts, part + 1);
        for (int64_t b = cpu::part_begin(num_blocks, parts, part); b < b1; ++b) {
          const Block blk = plan.block(b, g);
          int64_t channel_stride = 0;
          const acc_t* win = block_window(g, plan, input, static_cast<const Source<scalar_t>*>(nullptr), blk, 0,
                                          g.in_channels, window.get(), channel_stride);
          const int64_t columns = blk.rows * plan.width - (g.kernel_w - 1);
          masked_gradient(g, plan, grad_out, mask, blk, masked.get(), masked_t.get(), bias_sum);
          if (shifted) {
            shifted_rows(g, plan, win, channel_stride, g.in_channels, columns, rows_buffer.get());
            cpu::gemm(g.taps(), g.out_channels, columns, rows_buffer.get(), columns, masked_t.get(),
                      g.out_channels, weight_sum, g.out_channels, true);
            continue;
          }
          for (int64_t tap = 0; tap < taps; ++tap) {
            const int64_t ky = tap / g.kernel_w, kx = tap % g.kernel_w;
            cpu::gemm(g.in_channels, g.out_channels, columns, win + ky * plan.width + kx, channel_stride,
                      masked_t.get(), g.out_channels, weight_sum + tap * tap_size, g.out_channels, true);
          }
        }
      }
      cpu::gemm_release();
    });
    sums.copy_(weight_partials.sum(0));
    grad_bias.copy_(bias_partials.sum(0));
  }
  acc_t* out = grad_weight.mutable_data_ptr<acc_t>();
  if (shifted) {  // [(c, ky, kx)][C_out] -> [C_out][(c, ky, kx)]
    cpu::transpose(static_cast<const acc_t*>(dw), g.taps(), g.out_channels, out);
  } else {  // [kh*kw][C_in][C_out] -> [C_out][C_in][kh*kw]
    std::vector<acc_t> by_tap(taps * tap_size);  // [kh*kw][C_out][C_in]
    for (int64_t t = 0; t < taps; ++t)
      cpu::transpose(static_cast<const acc_t*>(dw) + t * tap_size, g.in_channels, g.out_channels, by_tap.data() + t * tap_size);
    cpu::transpose(static_cast<const acc_t*>(by_tap.data()), taps, tap_size, out);
  }
}

// Weight repacking with tiled transposes (a permuted at::contiguous of the 512-channel
// weights takes longer than the convolution of U-Net's 22x22 bottom map).
// Forward taps [kh*kw][C_out][C_in] from weight [C_out][C_in][kh][kw].
inline at::Tensor forward_taps(const at::Tensor& weight) {
  const at::Tensor w = opmath_contiguous(weight);
  const int64_t taps = w.size(2) * w.size(3);
  at::Tensor out = at::empty({w.size(2), w.size(3), w.size(0), w.size(1)}, w.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "forward_taps", [&] {
    cpu::transpose(w.const_data_ptr<scalar_t>(), w.size(0) * w.size(1), taps, out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

// dgrad taps [kh*kw][C_in][C_out]: tap t holds W[:, :, kh*kw - 1 - t] (the flipped kernel), transposed.
inline at::Tensor dgrad_taps(const at::Tensor& weight) {
  const at::Tensor w = opmath_contiguous(weight);
  const int64_t c_out = w.size(0), c_in = w.size(1), taps = w.size(2) * w.size(3);
  at::Tensor by_input = at::empty({c_in * taps, c_out}, w.options());  // [(ci, t)][co]
  at::Tensor out = at::empty({w.size(2), w.size(3), c_in, c_out}, w.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "dgrad_taps", [&] {
    cpu::transpose(w.const_data_ptr<scalar_t>(), c_out, c_in * taps, by_input.mutable_data_ptr<scalar_t>());
    const scalar_t* src = by_input.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    for (int64_t ci = 0; ci < c_in; ++ci)
      for (int64_t t = 0; t < taps; ++t)
        std::copy(src + (ci * taps + t) * c_out, src + (ci * taps + t + 1) * c_out,
                  dst + ((taps - 1 - t) * c_in + ci) * c_out);
  });
  return out;
}

// dgrad weight as stored for the shifted-rows GEMM: [C_in][C_out][kh*kw], W'[ci][co][t] =
// W[co][ci][kh*kw - 1 - t]; parallel over ci (37 MB for the 1024-channel layers).
inline at::Tensor dgrad_matrix(const at::Tensor& weight) {
  const at::Tensor w = opmath_contiguous(weight);
  const int64_t c_out = w.size(0), c_in = w.size(1), taps = w.size(2) * w.size(3);
  at::Tensor out = at::empty({c_in, c_out, w.size(2), w.size(3)}, w.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "dgrad_matrix", [&] {
    const scalar_t* src = w.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, c_in, 1, [&](int64_t ci0, int64_t ci1) {
      for (int64_t ci = ci0; ci < ci1; ++ci)
        for (int64_t co = 0; co < c_out; ++co) {
          const scalar_t* from = src + (co * c_in + ci) * taps;
          scalar_t* to = dst + (ci * c_out + co) * taps;
          for (int64_t t = 0; t < taps; ++t) to[t] = from[taps - 1 - t];
        }
    });
  });
  return out;
}

// U-Net's deep layers (256 input channels and more) in float32 go to oneDNN's direct
// convolution, as stock PyTorch's do, with bias and ReLU as its post-ops: there it runs at the
// FMA peak, which our GEMMs do not reach (the shifted rows are an im2col of up to 35 MB per
// image; per-tap GEMMs stream the large weights per block): 1024->1024 at 32x32 forward 90 vs
// 114 ms, 512->512 at 68x68 ~92 vs 120 ms (2 threads). Backward: the masked gradient in one
// pass, then oneDNN's dgrad/wgrad. The wide, shallow layers, where stock PyTorch is slow and
// the fusion pays, stay on the kernels above.
// Taken where the weights are not small against the image (kh*kw*C_out >= H*W / 10): at
// 256 -> 128 channels on 200x200 the fused path is still ahead (122 vs 134 ms).
// bfloat16 goes to oneDNN from kBf16OneDnnChannels input channels (by default all of them) where
// the CPU has bf16 dot products (AVX512-BF16, AMX): its bf16 convolution accumulates in float32
// at about twice its float32 rate, where the kernels above convert each window to float32 and
// run float32 GEMMs. A threshold of 64 (the shallow layers on the kernels above) looked better on
// a loaded machine; measured quiet, with the UNet channels_last at oneDNN's levels, all-oneDNN
// training steps are 15-25% faster (base 32 2x316: 0.29-0.31 s against 0.36-0.46 s; base 16
// 4x252: 0.41-0.45 s against 0.45-0.63 s). The kernels above serve bf16 on CPUs without bf16
// dot products. The fusions kept on oneDNN: bias + ReLU as post-ops, the backward's mask in one
// pass. UNET_EXT_BF16_ONEDNN_CHANNELS overrides the threshold (read per call: a knob for
// benchmarks; unet_ext.UNet reads it at import for its layouts).
constexpr int64_t kOneDnnChannels = 256, kBf16OneDnnChannels = 0;
inline int64_t bf16_onednn_channels() {
  const char* value = std::getenv("UNET_EXT_BF16_ONEDNN_CHANNELS");
  return value != nullptr ? std::atoll(value) : kBf16OneDnnChannels;
}
inline bool use_onednn(const ConvGeometry& g, at::ScalarType dtype) {
  if (!at::hasMKLDNN() || !at::globalContext().userEnabledMkldnn()) return false;
  if (dtype == at::kBFloat16) return cpu::has_bf16_dot_products() && g.in_channels >= bf16_onednn_channels();
  // float32 only from torch 2.14: torch 2.11's mkldnn::_convolution_pointwise is 7x less accurate
  // than its own F.conv2d (1.1e-5 against 1.7e-6 on a 600 -> 512 layer); there the kernels above serve.
  constexpr bool kAccurateFloat32 = TORCH_VERSION_MAJOR > 2 || TORCH_VERSION_MINOR >= 14;
  return kAccurateFloat32 && dtype == at::kFloat && g.in_channels >= kOneDnnChannels &&
         10 * g.kernel_h * g.kernel_w * g.out_channels >= g.in_h * g.in_w;
}

// ReLU's backward (grad where output > 0, else 0; a NaN output keeps its gradient) in one
// vectorised pass, into a block of the output cache (empty_huge): a fresh activation-sized
// at::empty pays a page fault per 4 KiB on first touch, every step.
inline at::Tensor relu_backward(const at::Tensor& grad, const at::Tensor& output, at::MemoryFormat format) {
  at::Tensor out = empty_huge(grad.sizes(), grad.options(), format);
  return at::threshold_backward_out(out, grad, output, 0);
}

inline at::Tensor onednn_forward(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          int64_t padding, bool relu) {
  static const c10::OperatorHandle pointwise =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_convolution_pointwise", "");
  torch::jit::Stack stack;
  // channels_last stays channels_last: oneDNN runs it as nhwc directly (bf16 fwd+bwd 10-25% faster
  // than NCHW here); converting it to NCHW and back cost two copies on top.
  // A channels_last weight stays channels_last too (bf16 autocast casts it so: autocast/conv2d_relu.cpp).
  torch::jit::push(stack, input.contiguous(conv_memory_format(input)), weight.contiguous(weight.suggest_memory_format()),
                   bias.has_value() && bias->defined() ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt,
                   std::vector<int64_t>{padding, padding}, std::vector<int64_t>{1, 1}, std::vector<int64_t>{1, 1},
                   int64_t{1}, std::string(relu ? "relu" : "none"), c10::List<std::optional<at::Scalar>>(),
                   std::optional<std::string>());
  pointwise.callBoxed(&stack);
  return torch::jit::pop(stack).toTensor();
}


}  // namespace cpu_kernel
}  // namespace conv
}  // namespace unet_ext
