// The CPU Winograd F(4x4, 3x3) convolution's few-tiles path (convolve_few; routed by use_few_tiles
// in winograd.cpp): the output channels as the GEMMs' vector dimension, for the deep layers' few
// tiles with filters transformed per call.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "gemm.h"  // cpu::scratch
#include "huge_pages.h"
#include "winograd_driver.h"

namespace unet_ext {
namespace winograd {

using conv::ChannelParts;
using conv::ConvGeometry;

// Few tiles (the deep layers at small batches): the brgemm path's GEMMs have the tiles as their
// vector dimension, 9-45 per block, and 16 channels of depth per call; here the output channels
// are (few_gemm: M^T_p[T, C_out] = V^T_p[T, C_in] U^T_p[C_in, C_out], V read in its [C_in][T] layout
// by broadcasts). Three passes: the input transform of every block (tasks over blocks and channel
// parts); tasks over panels of output channels, each transforming its panel's filters into U^T
// (all 36 points) and running the GEMMs of every point and block on it; the output transform per
// block and channel part, reading M^T in place (output_transform_few, vectors of output channels).
// It replaced a transpose of M^T's part into output_transform's layout: with it (and the filter
// transform's gather by shuffles, cpu/winograd_kernel.h), training conditions (a new weight
// version per call), medians of 21, builds alternating, three runs each: forward / dgrad 2 x 512
// -> 256 at 24x24 9.0-9.4 / 9.6-9.8 -> 8.0-8.2 / 7.1-7.3 ms (stock 11.0-11.2 / 11.0-11.3), 256 ->
// 256 at 22 3.6 / 5.1 -> 2.9 / 4.1 (stock 4.8 / 4.8).
// Filter panels of 32 output channels (36 x C_in x 32 floats, 2.4 MB at 512): 16 (a one-vector GEMM)
// and 48 or 64 (past the L2) were 10-40% slower at the deep layers.
constexpr int64_t kFewBlockTiles = 64, kFewChannels = 64, kFewFilterPanel = 32;

bool convolve_few(const ConvGeometry& g, const ChannelParts<const float>& src, const ChannelParts<const float>* mask,
                  const Filters& filters, const float* bias, bool relu, const ChannelParts<float>& dst) {
  // few_gemm and output_transform_few move whole vectors of output channels (use_few_tiles' rule).
  TORCH_INTERNAL_ASSERT(g.out_channels % 16 == 0, "convolve_few: out_channels must be a multiple of 16, got ", g.out_channels);
  const int64_t c_in = g.in_channels, c_out = g.out_channels;
  const BlockPlan plan(g, kFewBlockTiles);
  std::vector<int64_t> first(plan.blocks + 1, 0);  // block bi's tiles start at first[bi]
  for (int64_t bi = 0; bi < plan.blocks; ++bi) first[bi + 1] = first[bi] + plan.block(bi).tiles();
  const int64_t tiles = first.back();
  const at::TensorOptions options = at::TensorOptions().dtype(at::kFloat);
  // Per block: V[36][C_in][T_b] at kPoints * C_in * first[bi], M^T[36][T_b][C_out] at kPoints * C_out * first[bi].
  at::Tensor v_all = cpu::empty_huge({kPoints * c_in * tiles}, options);
  at::Tensor m_all = cpu::empty_huge({kPoints * c_out * tiles}, options);
  float* v_data = v_all.mutable_data_ptr<float>();
  float* m_data = m_all.mutable_data_ptr<float>();
  const Kernels& k = kernels();
  const int64_t c_parts = (c_in + kFewChannels - 1) / kFewChannels;
  at::parallel_for(0, plan.blocks * c_parts, 1, [&](int64_t t0, int64_t t1) {
    float* work = cpu::scratch<float>(2, transform_scratch(plan.cols));
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t bi = task / c_parts, c0 = (task % c_parts) * kFewChannels;
      const TileBlock b = plan.block(bi);
      k.input(g, src, mask, b, c0, std::min(c_in, c0 + kFewChannels), v_data + kPoints * c_in * first[bi] + c0 * b.tiles(),
              c_in * b.tiles(), work);
    }
  });
  // M^T_p[:, co0 .. co0 + cols) for all blocks from u's point p (u + p * point_stride, rows ldu apart)
  const auto gemms = [&](int64_t p, const float* u, int64_t ldu, int64_t co0, int64_t cols) {
    for (int64_t bi = 0; bi < plan.blocks; ++bi) {
      const int64_t t_count = first[bi + 1] - first[bi];
      k.few(v_data + kPoints * c_in * first[bi] + p * c_in * t_count, t_count, u, ldu,
            m_data + kPoints * c_out * first[bi] + p * t_count * c_out + co0, c_out, t_count, cols, c_in);
    }
  };
  // The filters transformed here, a panel of output channels per task, used while in the cache: U^T
  // of 512 x 512 filters (38 MB) written by the filter transform and read back by the GEMMs had
  // made them 2 x 6.5 ms of 2 x 512 -> 512 at 14x14's 11.6 ms forward.
  const FilterSource f = filter_source(filters.weight, filters.dgrad, true);
  const float* w_data = f.source.const_data_ptr<float>();
  const int64_t panels = (c_out + kFewFilterPanel - 1) / kFewFilterPanel;
  at::parallel_for(0, panels, 1, [&](int64_t t0, int64_t t1) {
    float* u = cpu::scratch<float>(0, kPoints * c_in * kFewFilterPanel);
    std::vector<double> scratch(filter_scratch(kFewFilterPanel));
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t co0 = task * kFewFilterPanel, cols = std::min(kFewFilterPanel, c_out - co0);
      k.filter(w_data + co0 * f.col_stride, c_in, cols, f.row_stride, f.col_stride, f.tap_stride, f.flip, 0, c_in, u,
               scratch.data());
      for (int64_t p = 0; p < kPoints; ++p) gemms(p, u + p * c_in * cols, cols, co0, cols);
    }
  });
  std::atomic<bool> finite{true};
  const int64_t co_parts = (c_out + kFewChannels - 1) / kFewChannels;
  at::parallel_for(0, plan.blocks * co_parts, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t bi = task / co_parts, co0 = (task % co_parts) * kFewChannels;
      const int64_t count = std::min(kFewChannels, c_out - co0);
      const TileBlock b = plan.block(bi);
      const float* mt = m_data + kPoints * c_out * first[bi] + co0;
      if (!k.output_few(g, mt, c_out, b.tiles() * c_out, co0, count, bias, relu, dst, b)) {
        finite.store(false, std::memory_order_relaxed);
      }
    }
  });
  return finite.load();
}

}  // namespace winograd
}  // namespace unet_ext
