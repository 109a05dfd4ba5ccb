// The CPU Winograd F(4x4, 3x3) convolution (winograd.h's tile math): its per-ISA transform
// kernels (cpu/winograd_kernel.h, built per ISA in winograd_<isa>.cpp) and the driver that runs
// them around 36 batched GEMMs (cpu/winograd.cpp). Layouts (float32): transformed filters
// U[36][C_out][C_in]; per task, transformed inputs V[36][C_in][T] and products M[36][C_out][T]
// for a block of T tiles (row-major in the block), so that each of the 36 points is one GEMM
// M_p[C_out, T] = U_p[C_out, C_in] V_p[C_in, T] with the tiles as the vectorised dimension.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>

#include "../conv_host.h"
#include "../winograd.h"

namespace unet_ext {
namespace winograd {

// A block of tiles: tile rows [ty0, ty0 + rows) x tile columns [tx0, tx0 + cols) of image n;
// tile t = r * cols + x covers output rows 4 (ty0 + r) .. +3, columns 4 (tx0 + x) .. +3.
struct TileBlock {
  int64_t n, ty0, rows, tx0, cols;
  int64_t tiles() const { return rows * cols; }
};

// Per-ISA kernels. input: V[p * point_stride + (c - c0) * T + t] for channels [c0, c1) of src
// (zero where mask <= 0; zero outside the input); output: dst = [relu](A^T M A + bias) for the
// block's channels [co0, co0 + co_count), M[p][co - co0][t] (false if a pre-activation is not
// finite); filter: U[p][r][c] = G g G^T of
// the 3x3 filter g at w + r * row_stride + c * col_stride, tap t at + t * tap_stride (rotated by
// 180 degrees when flip),
// for rows [r0, r1) of `rows` x `cols`. The transforms' scratch: transform_scratch(b.cols)
// floats; the filter's: filter_scratch(cols) doubles.
// The input, output and gradient transforms take tile rows shorter than a vector (and rows of one
// vector and a remainder: winograd_kernel.h's group_rows) up to kRowGroupTiles tiles at a time (their scratch then: 72 floats a tile and two rows' phases; 40 a tile and a vector).
constexpr int64_t kRowGroupTiles = 64;
inline int64_t transform_scratch(int64_t cols) {
  return std::max<int64_t>(kIn * (kOut * cols + kKernel - 1) + kPoints * cols, 80 * kRowGroupTiles);
}
inline int64_t filter_scratch(int64_t cols) { return kKernel * kKernel * cols; }
// The weight gradient's kernels (F(3x3, 4x4), winograd.h's weight_gradient_tile). grad_transform:
// Y[p * point_stride + t * C_out + co] = A dy A^T of the block's output gradient (zero where mask
// <= 0 and past the output) for channels [co0, co1), and sums[co - co0] += the gradient's sum (the
// bias gradient); weight_transform: dw[co][ci][3x3] = G^T M G for ci in [ci0, ci1), co in [co0, co1),
// M[p][ci - ci0][co - co0] (false if a result is not finite). Scratch: grad_scratch(b.cols),
// weight_scratch(co1 - co0) floats.
constexpr int64_t kGradChannels = 16;  // grad_transform's channel group: a 64-byte line of Y
inline int64_t grad_scratch(int64_t cols) {
  return (kOut + kOut * kOut + kOut * kIn + kGradChannels * kPoints) * std::max(cols, kRowGroupTiles);
}
// output_transform_few: as output, from the few-tiles path's M^T[p * point_stride + t * ldm + co - co0]
// (co_count a multiple of the ISA's vector; no scratch).
// The few-tiles path's GEMM (convolve with transposed filters): m[t * ldm + c] = sum_k v[k * ldv
// + t] u[k * ldu + c] for t < rows, c < cols (a multiple of 16), the output channels as the
// vector dimension, summed in kChunk / kGroup as the brgemm path (winograd.cpp).
constexpr int64_t kChunk = 16, kGroup = 64;
inline int64_t weight_scratch(int64_t c_out) { return (kKernel * kIn + kKernel * kKernel) * c_out; }
#define UNET_DECLARE_WINOGRAD_CPU_KERNELS(ISA)                                                          \
  namespace ISA {                                                                                      \
  void input_transform(const conv::ConvGeometry& g, const conv::ChannelParts<const float>& src,        \
                       const conv::ChannelParts<const float>* mask, const TileBlock& b, int64_t c0,    \
                       int64_t c1, float* v, int64_t point_stride, float* scratch);                    \
  bool output_transform(const conv::ConvGeometry& g, const float* m, int64_t co0, int64_t co_count,    \
                        const float* bias, bool relu, const conv::ChannelParts<float>& dst,            \
                        const TileBlock& b, float* scratch);                                           \
  bool output_transform_few(const conv::ConvGeometry& g, const float* mt, int64_t ldm, int64_t point_stride,  \
                            int64_t co0, int64_t co_count, const float* bias, bool relu,                  \
                            const conv::ChannelParts<float>& dst, const TileBlock& b);                     \
  void filter_transform(const float* w, int64_t rows, int64_t cols, int64_t row_stride,               \
                        int64_t col_stride, int64_t tap_stride, bool flip, int64_t r0, int64_t r1,      \
                        float* u, double* scratch);                                                     \
  void grad_transform(const conv::ConvGeometry& g, const conv::ChannelParts<const float>& grad,          \
                      const conv::ChannelParts<const float>* mask, const TileBlock& b, int64_t co0,         \
                      int64_t co1, float* y, int64_t point_stride, double* sums, float* scratch);           \
  bool weight_transform(const float* m, int64_t point_stride, int64_t ci0, int64_t ci1, int64_t c_in,      \
                        int64_t co0, int64_t co1, float* dw, float* scratch);                                \
  void add(float* dst, const float* src, int64_t n);                                                   \
  void few_gemm(const float* v, int64_t ldv, const float* u, int64_t ldu, float* m, int64_t ldm,          \
                int64_t rows, int64_t cols, int64_t depth);                                             \
  }
UNET_DECLARE_WINOGRAD_CPU_KERNELS(baseline)
UNET_DECLARE_WINOGRAD_CPU_KERNELS(avx2)
UNET_DECLARE_WINOGRAD_CPU_KERNELS(avx512)
#undef UNET_DECLARE_WINOGRAD_CPU_KERNELS

// unet_ext.backends.cpu.allow_winograd (default on): float32 only, float64 never.
bool allow_winograd();
void set_allow_winograd(bool allow);

// Whether the Winograd path serves this convolution (see the measurements in winograd.cpp);
// filter_per_call: its filters are transformed on this call (dgrad; and the forward on a weight
// version's first call, use_winograd_forward), so small images stay direct.
bool use_winograd(const conv::ConvGeometry& g, at::ScalarType dtype, bool filter_per_call);
// per_call: set to whether its filters are transformed on this call (for forward_filter).
bool use_winograd_forward(const conv::ConvGeometry& g, at::ScalarType dtype, const at::Tensor& weight,
                          bool* per_call);
bool filter_cache_enabled();
// Whether a convolution use_winograd takes with filters transformed on the call runs the few-tiles
// path (winograd_few.cpp: convolve_few, transposed filters): pass the answer to forward_filter /
// dgrad_filter (the forward's only where per_call).
bool use_few_tiles(const conv::ConvGeometry& g);
// Whether the weight gradient of this convolution takes weight_gradient below.
bool use_winograd_wgrad(const conv::ConvGeometry& g, at::ScalarType dtype);

// Transformed filters, float32: forward U[36][C_out][C_in] of weight [C_out][C_in][3][3];
// dgrad U[36][C_in][C_out] of the flipped, transposed weight; cached per weight version where
// that is safe (winograd.cpp). With few (use_few_tiles; the forward's only on a per-call version)
// u is undefined: convolve transforms the weight itself, per panel of output channels, into the
// transposes (U^T[36][C_in][C_out] forward, U^T[36][C_out][C_in] dgrad).
struct Filters {
  at::Tensor u, weight;
  bool few, dgrad;
};
Filters forward_filter(const at::Tensor& weight, bool few, bool per_call);
Filters dgrad_filter(const at::Tensor& weight, bool few);

// dst = [relu](conv(src [masked]) + bias) for a 3x3 stride-1 geometry g (float32), filters as
// forward_filter's (g's C_out x C_in; few: the few-tiles path). Returns false
// when an output before the ReLU is not finite: a NaN or infinity spreads over whole 6x6 tiles here (and large finite values can
// overflow in the transforms), so the caller recomputes by the direct path, whose non-finite
// outputs are stock's.
bool convolve(const conv::ConvGeometry& g, const conv::ChannelParts<const float>& src,
              const conv::ChannelParts<const float>* mask, const Filters& filters, const float* bias,
              bool relu, const conv::ChannelParts<float>& dst);

// The weight gradient by Winograd F(3x3, 4x4): grad_weight [C_out][C_in][3][3] (float32, every
// element written) of the 3x3 stride-1 geometry g from src and grad (the output gradient, dense
// N x C_out x H_out x W_out; zero where mask <= 0 when mask is given), and grad_bias [C_out] (its
// sums, when not null). Returns false when a result is not finite (the caller recomputes by the
// direct path, as for convolve).
bool weight_gradient(const conv::ConvGeometry& g, const conv::ChannelParts<const float>& src,
                     const conv::ChannelParts<const float>& grad, const conv::ChannelParts<const float>* mask,
                     float* grad_weight, float* grad_bias);

}  // namespace winograd
}  // namespace unet_ext
