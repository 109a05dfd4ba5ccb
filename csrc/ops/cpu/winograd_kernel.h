// The transforms of the CPU Winograd F(4x4, 3x3) convolution (layouts in winograd_cpu.h), built
// once per ISA (winograd_<isa>.cpp includes this under its target flags, in namespace
// UNET_CPU_ISA). Each 2-D transform is two passes of winograd::apply vectorised over the tiles of a
// block row (or a filter's channels): along the rows into a small buffer, then down the columns.
// No torch headers here: everything inlined below is compiled for the ISA of its file only.

namespace unet_ext {
namespace winograd {
namespace UNET_CPU_ISA {

using conv::ChannelParts;
using conv::ConvGeometry;

void input_transform(const ConvGeometry& g, const ChannelParts<const float>& src,
                     const ChannelParts<const float>* mask, const TileBlock& b, int64_t c0, int64_t c1,
                     float* v, int64_t point_stride, float* scratch) {
  const int64_t cols = b.cols, width = kOut * cols + kKernel - 1, t_count = b.tiles();
  const int64_t col0 = kOut * b.tx0 - g.pad_w;  // input column of the row buffer's first element
  const int64_t lo = col0 < 0 ? std::min<int64_t>(-col0, width) : 0;
  const int64_t hi = std::max<int64_t>(lo, std::min<int64_t>(width, g.in_w - col0));
  float* rows = scratch;                 // [6][width]: the block row's 6 input rows, zero-padded
  float* h = scratch + kIn * width;      // [6 rows][6 k][cols]: B^T along each input row
  for (int64_t c = c0; c < c1; ++c) {
    for (int64_t r = 0; r < b.rows; ++r) {
      for (int y = 0; y < kIn; ++y) {
        float* d = rows + y * width;
        const int64_t ih = kOut * (b.ty0 + r) + y - g.pad_h;
        float* hy = h + y * kIn * cols;
        if (ih < 0 || ih >= g.in_h) {  // a padding row: its transform is zero
          std::fill(hy, hy + kIn * cols, 0.0f);
          continue;
        }
        const float* s = src.at(b.n, c, ih) + col0;
        std::fill(d, d + lo, 0.0f);
        if (mask) {
          const float* m = mask->at(b.n, c, ih) + col0;
          for (int64_t x = lo; x < hi; ++x) d[x] = m[x] <= 0.0f ? 0.0f : s[x];  // NaN outputs pass, as in ReLU's backward
        } else {
          std::copy(s + lo, s + hi, d + lo);
        }
        std::fill(d + hi, d + width, 0.0f);
        apply<kBT, kIn, kIn, kOut, 1>(d, 1, hy, cols, cols);
      }
      // V[(i, k)][c][r * cols + x] = sum_y B^T[i][y] h[y][k][x]
      float* out = v + (c - c0) * t_count + r * cols;
      for (int k = 0; k < kIn; ++k) {
        apply<kBT, kIn, kIn, 1, 1>(h + k * cols, kIn * cols, out + k * point_stride, kIn * point_stride, cols);
      }
    }
  }
}

void output_transform(const ConvGeometry& g, const float* m, int64_t co0, int64_t co_count,
                      const float* bias, bool relu, const ChannelParts<float>& dst, const TileBlock& b,
                      float* scratch) {
  const int64_t cols = b.cols, t_count = b.tiles(), point_stride = co_count * t_count;
  const int64_t ow0 = kOut * b.tx0, count = std::min<int64_t>(kOut * cols, g.out_w - ow0);
  float* s = scratch;                   // [4 a][6 k][cols]: A^T down the columns
  float* y = scratch + kOut * kIn * cols;  // [4 * cols]: one output row of the block
  for (int64_t k = 0; k < co_count; ++k) {
    const int64_t co = co0 + k;
    const float shift = bias ? bias[co] : 0.0f;
    for (int64_t r = 0; r < b.rows; ++r) {
      const float* in = m + k * t_count + r * cols;
      for (int kk = 0; kk < kIn; ++kk) {
        apply<kAT, kOut, kIn, 1, 1>(in + kk * point_stride, kIn * point_stride, s + kk * cols, kIn * cols, cols);
      }
      for (int a = 0; a < kOut; ++a) {
        const int64_t oh = kOut * (b.ty0 + r) + a;
        if (oh >= g.out_h) break;
        apply<kAT, kOut, kIn, 1, kOut>(s + a * kIn * cols, cols, y, 1, cols);
        float* d = dst.at(b.n, co, oh) + ow0;
        if (relu) {
          // v < 0 ? 0 : v keeps NaN, as torch.relu does.
          for (int64_t i = 0; i < count; ++i) {
            const float value = y[i] + shift;
            d[i] = value < 0.0f ? 0.0f : value;
          }
        } else {
          for (int64_t i = 0; i < count; ++i) d[i] = y[i] + shift;
        }
      }
    }
  }
}

void filter_transform(const float* w, int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride,
                      bool flip, int64_t r0, int64_t r1, float* u, double* scratch) {
  // In float64, rounded once: G's thirds and sixths are not exact in float32.
  double* taps = scratch;                              // [ky][kx][cols]
  double* half = taps + kKernel * kKernel * cols;      // [a][kx][cols]: G down the columns
  double* full = half + kIn * kKernel * cols;          // [a][b][cols]
  constexpr int kTaps = kKernel * kKernel;
  for (int64_t r = r0; r < r1; ++r) {
    for (int t = 0; t < kTaps; ++t) {
      const float* from = w + r * row_stride + (flip ? kTaps - 1 - t : t);
      for (int64_t c = 0; c < cols; ++c) taps[t * cols + c] = from[c * col_stride];
    }
    for (int kx = 0; kx < kKernel; ++kx) {
      apply<kG, kIn, kKernel, 1, 1>(taps + kx * cols, kKernel * cols, half + kx * cols, kKernel * cols, cols);
    }
    for (int a = 0; a < kIn; ++a) {
      apply<kG, kIn, kKernel, 1, 1>(half + a * kKernel * cols, cols, full + a * kIn * cols, cols, cols);
    }
    for (int p = 0; p < kPoints; ++p) {
      float* to = u + (p * rows + r) * cols;
      for (int64_t c = 0; c < cols; ++c) to[c] = static_cast<float>(full[p * cols + c]);
    }
  }
}

}  // namespace UNET_CPU_ISA
}  // namespace winograd
}  // namespace unet_ext
