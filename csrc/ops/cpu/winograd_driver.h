// The parts of the CPU Winograd driver that its two files share: winograd.cpp (the brgemm path,
// the filter transforms and their cache, the selection rules, the weight gradient) and
// winograd_few.cpp (the few-tiles path, convolve_few).
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>

#include "winograd_cpu.h"

namespace unet_ext {
namespace winograd {

// The transforms and GEMM kernels of the best ISA (cpu::best_isa(), chosen once: winograd.cpp).
struct Kernels {
  decltype(&baseline::input_transform) input;
  decltype(&baseline::output_transform) output;
  decltype(&baseline::output_transform_few) output_few;
  decltype(&baseline::filter_transform) filter;
  decltype(&baseline::add) add;
  decltype(&baseline::grad_transform) grad;
  decltype(&baseline::weight_transform) weight;
  decltype(&baseline::few_gemm) few;
};

const Kernels& kernels();

// The few-tiles path's filters (few_layout) are the transposes: U^T[36][C_in][C_out] forward (read
// as dgrad reads), U^T[36][C_out][C_in] of the flipped filters for dgrad (read as the forward).
struct FilterSource {
  at::Tensor source;  // the weight, or its copy transposed to [C_in][3x3][C_out]
  int64_t rows, cols, row_stride, col_stride, tap_stride;
  bool flip;
};

// The weight (float32, contiguous; dgrad: flipped) as filter_transform reads it into U (or U^T with
// few_layout): rows x cols filters, winograd.cpp.
FilterSource filter_source(const at::Tensor& weight, bool dgrad, bool few_layout);

// The tile blocks of a convolution's output: about `target` tiles each, whole tile rows while a
// row is shorter than the target, else row segments of at least `target` tiles (rounding the
// number of segments up gave 64 -> 64 at 290x290, 72 tiles a row, blocks of 36 tiles, and
// 128 -> 128 at 282 blocks of 35: 20-25% slower than whole rows); equal sizes (balanced tasks).
struct BlockPlan {
  int64_t tiles_h, tiles_w, rows, cols, row_blocks, col_blocks, blocks;
  BlockPlan(const conv::ConvGeometry& g, int64_t target) {
    tiles_h = (g.out_h + kOut - 1) / kOut;
    tiles_w = (g.out_w + kOut - 1) / kOut;
    cols = tiles_w;
    rows = std::min(tiles_h, (target + tiles_w - 1) / tiles_w);
    if (tiles_w > target) {
      const int64_t parts = std::max<int64_t>(1, tiles_w / target);
      cols = (tiles_w + parts - 1) / parts;
      rows = 1;
    }
    row_blocks = (tiles_h + rows - 1) / rows;
    rows = (tiles_h + row_blocks - 1) / row_blocks;
    row_blocks = (tiles_h + rows - 1) / rows;
    col_blocks = (tiles_w + cols - 1) / cols;
    blocks = g.batch * row_blocks * col_blocks;
  }
  TileBlock block(int64_t bi) const {
    const int64_t ty = (bi / col_blocks) % row_blocks, tx = bi % col_blocks;
    return TileBlock{bi / (col_blocks * row_blocks), ty * rows, std::min(rows, tiles_h - ty * rows), tx * cols,
                     std::min(cols, tiles_w - tx * cols)};
  }
};

// convolve on the few-tiles path (Filters::few): winograd_few.cpp.
bool convolve_few(const conv::ConvGeometry& g, const conv::ChannelParts<const float>& src,
                  const conv::ChannelParts<const float>* mask, const Filters& filters, const float* bias, bool relu,
                  const conv::ChannelParts<float>& dst);

}  // namespace winograd
}  // namespace unet_ext
