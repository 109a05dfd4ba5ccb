// Winograd minimal filtering F(4x4, 3x3) (Lavin & Gray, 2016), torch-free: a 4x4 output tile of a
// 3x3 convolution is A^T [(G g G^T) . (B^T d B)] A for the 6x6 input tile d and the filter g,
// so 36 products per channel pair instead of 144. The matrices are written here once; the
// one-tile functions (the float64 unit test) and the CPU kernels (cpu/winograd_kernel.h) both
// apply them through `apply`, which skips the zero entries and the multiplications by +-1 at
// compile time.
#pragma once

#include <cstdint>
#include <utility>

#include "common/macros.h"

namespace unet_ext {
namespace winograd {

constexpr int kOut = 4, kKernel = 3, kIn = kOut + kKernel - 1;  // 6x6 input tiles
constexpr int kPoints = kIn * kIn;                              // 36 element-wise products

// Interpolation points 0, 1, -1, 2, -2 and infinity.
inline constexpr double kBT[kIn][kIn] = {{4, 0, -5, 0, 1, 0},  {0, -4, -4, 1, 1, 0}, {0, 4, -4, -1, 1, 0},
                                         {0, -2, -1, 2, 1, 0}, {0, 2, -1, -2, 1, 0}, {0, 4, 0, -5, 0, 1}};
inline constexpr double kG[kIn][kKernel] = {{1.0 / 4, 0, 0},
                                            {-1.0 / 6, -1.0 / 6, -1.0 / 6},
                                            {-1.0 / 6, 1.0 / 6, -1.0 / 6},
                                            {1.0 / 24, 1.0 / 12, 1.0 / 6},
                                            {1.0 / 24, -1.0 / 12, 1.0 / 6},
                                            {0, 0, 1}};
inline constexpr double kAT[kOut][kIn] = {{1, 1, 1, 1, 1, 0}, {0, 1, -1, 2, -2, 0}, {0, 1, 1, 4, 4, 0}, {0, 1, -1, 8, -8, 1}};

namespace detail {
// acc + m * v, folded at compile time for m in {0, 1, -1}. acc starts at -0.0, which x + (-0.0)
// leaves exactly as it is, so the first term costs nothing either.
template <double m, typename T>
UNET_HD T add_term(T acc, T v) {
  if constexpr (m == 0) {
    return acc;
  } else if constexpr (m == 1) {
    return acc + v;
  } else if constexpr (m == -1) {
    return acc - v;
  } else {
    return acc + static_cast<T>(m) * v;
  }
}

template <const auto& M, int K, typename T, int... J>
UNET_HD T row_dot(const T* v, std::integer_sequence<int, J...>) {
  T acc = T(-0.0);
  ((acc = add_term<M[K][J]>(acc, v[J])), ...);
  return acc;
}

template <const auto& M, int C, typename T, int... K>
UNET_HD void rows_dot(const T* v, T* out, int64_t out_k, std::integer_sequence<int, K...>) {
  ((out[K * out_k] = row_dot<M, K>(v, std::make_integer_sequence<int, C>{})), ...);
}
}  // namespace detail

// out[x * OutX + k * out_k] = sum_j M[k][j] in[x * InX + j * in_j] for x < n, M an R x C matrix:
// one 1-D transform per x, vectorised over x (the tiles of a row, or the channels of a filter).
template <const auto& M, int R, int C, int InX, int OutX, typename T>
UNET_HD void apply(const T* __restrict in, int64_t in_j, T* __restrict out, int64_t out_k, int64_t n) {
  for (int64_t x = 0; x < n; ++x) {
    T v[C];
    for (int j = 0; j < C; ++j) v[j] = in[x * InX + j * in_j];
    detail::rows_dot<M, C>(v, out + x * OutX, out_k, std::make_integer_sequence<int, R>{});
  }
}

// out (R x R, row pitch R) = M in M^T for in (C x C, row pitch C): one tile's 2-D transform.
template <const auto& M, int R, int C, typename T>
UNET_HD void transform_tile(const T* in, T* out) {
  T tmp[R * C];  // M applied down the columns: tmp[r][c] = sum_j M[r][j] in[j][c]
  apply<M, R, C, 1, 1>(in, C, tmp, C, C);
  apply<M, R, C, C, R>(tmp, 1, out, 1, R);  // then along the rows: out[r][s] = sum_k M[s][k] tmp[r][k]
}

// One tile: the transformed filter G g G^T (6x6) of g (3x3), the transformed input B^T d B (6x6)
// of d (6x6), and the output A^T m A (4x4) of the products m (6x6), all row-major.
template <typename T>
UNET_HD void filter_tile(const T* g, T* u) { transform_tile<kG, kIn, kKernel>(g, u); }
template <typename T>
UNET_HD void input_tile(const T* d, T* v) { transform_tile<kBT, kIn, kIn>(d, v); }
template <typename T>
UNET_HD void output_tile(const T* m, T* y) { transform_tile<kAT, kOut, kIn>(m, y); }

// The 4x4 output tile of the 3x3 correlation of d (6x6) with g (3x3), by Winograd.
template <typename T>
UNET_HD void convolve_tile(const T* d, const T* g, T* y) {
  T u[kPoints], v[kPoints], m[kPoints];
  filter_tile(g, u);
  input_tile(d, v);
  for (int i = 0; i < kPoints; ++i) m[i] = u[i] * v[i];
  output_tile(m, y);
}

}  // namespace winograd
}  // namespace unet_ext
