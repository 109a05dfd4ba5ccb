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

// Interpolation points 0, 1, -1, 2, -1/2 and infinity (Toom-Cook; B^T's rows are the Lagrange
// numerators, G carries the denominators). Lavin's 0, +-1, +-2 give the same multiplications
// with about twice the rounding error in float32: measured against float64 on U-Net's layers, the
// rounding of V and of the output transform alone is 5.6x stock float32's error with +-2 and
// 2.7x with 2, -1/2 (one large and one small point keep A^T's and B^T's entries apart).
inline constexpr double kBT[kIn][kIn] = {{1, 1.5, -2, -1.5, 1, 0},  {0, -1, -2.5, -0.5, 1, 0},
                                         {0, 1, 0.5, -2.5, 1, 0},   {0, -0.5, -1, 0.5, 1, 0},
                                         {0, 2, -1, -2, 1, 0},      {0, 1, 1.5, -2, -1.5, 1}};
inline constexpr double kG[kIn][kKernel] = {{1, 0, 0},
                                            {-1.0 / 3, -1.0 / 3, -1.0 / 3},
                                            {1.0 / 3, -1.0 / 3, 1.0 / 3},
                                            {1.0 / 15, 2.0 / 15, 4.0 / 15},
                                            {-16.0 / 15, 8.0 / 15, -4.0 / 15},
                                            {0, 0, 1}};
inline constexpr double kAT[kOut][kIn] = {
    {1, 1, 1, 1, 1, 0}, {0, 1, -1, 2, -0.5, 0}, {0, 1, 1, 4, 0.25, 0}, {0, 1, -1, 8, -0.125, 1}};

// The weight gradient's F(3x3, 4x4) uses the transposes: A (6x4) on the output gradient's 4x4
// tiles and G^T (3x6) back to the 3x3 filter (weight_gradient_tile below).
template <int R, int C>
struct Transposed {  // the C x R transpose of an R x C matrix, indexed like a double[C][R]
  double m[C][R];
  constexpr const double* operator[](int i) const { return m[i]; }
};
template <int R, int C>
constexpr Transposed<R, C> transposed(const double (&a)[R][C]) {
  Transposed<R, C> t{};
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < C; ++j) t.m[j][i] = a[i][j];
  return t;
}
inline constexpr Transposed<kOut, kIn> kA = transposed(kAT);
inline constexpr Transposed<kIn, kKernel> kGT = transposed(kG);

// The CPU kernels run these on SIMD vectors inside functions built for an ISA (winograd_<isa>.cpp):
// inlined there always, never called out of line with the baseline ABI.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define UNET_WINOGRAD_INLINE UNET_HD
#else
#define UNET_WINOGRAD_INLINE inline __attribute__((always_inline))
#endif

namespace detail {
constexpr int first_nonzero(const double* row, int n) {
  for (int j = 0; j < n; ++j)
    if (row[j] != 0) return j;
  return n;
}

// acc + m * v for m = M[K][J], folded at compile time for m in {0, 1, -1}; terms up to the row's
// first nonzero entry (which starts acc) add nothing. T may be a SIMD vector of S
// (cpu/winograd_kernel.h). m is read here, not passed: a double template argument needs C++20,
// and the kit builds against torch 2.11 with C++17.
template <const auto& M, int K, int J, int First, typename S, typename T>
UNET_WINOGRAD_INLINE T add_term(T acc, T v) {
  constexpr double m = M[K][J];
  if constexpr (J <= First || m == 0) {
    return acc;
  } else if constexpr (m == 1) {
    return acc + v;
  } else if constexpr (m == -1) {
    return acc - v;
  } else {
    return acc + v * static_cast<S>(m);
  }
}

template <const auto& M, int K, int C, typename S, typename T, int... J>
UNET_WINOGRAD_INLINE T row_dot(const T* v, std::integer_sequence<int, J...>) {
  constexpr int first = first_nonzero(M[K], C);
  static_assert(first < C, "a transform matrix row is all zeros");
  constexpr double m = M[K][first];
  T acc = m == 1 ? v[first] : m == -1 ? -v[first] : v[first] * static_cast<S>(m);
  ((acc = add_term<M, K, J, first, S>(acc, v[J])), ...);
  return acc;
}

template <const auto& M, int C, typename S, typename T, int... K>
UNET_WINOGRAD_INLINE void rows_dot(const T* v, T* out, std::integer_sequence<int, K...>) {
  ((out[K] = row_dot<M, K, C, S>(v, std::make_integer_sequence<int, C>{})), ...);
}
}  // namespace detail

// out[k] = sum_j M[k][j] v[j] for the R x C matrix M: one 1-D transform, with its zero entries
// and multiplications by +-1 resolved at compile time. v and out may be scalars (S) or SIMD
// vectors of S, lane by lane.
template <const auto& M, int R, int C, typename S, typename T>
UNET_WINOGRAD_INLINE void transform(const T* v, T* out) {
  detail::rows_dot<M, C, S>(v, out, std::make_integer_sequence<int, R>{});
}

// out[x * OutX + k * out_k] = sum_j M[k][j] in[x * InX + j * in_j] for x < n, M an R x C matrix:
// one 1-D transform per x (scalar; the CPU kernels run the same transform on SIMD vectors).
template <const auto& M, int R, int C, int InX, int OutX, typename T>
UNET_HD void apply(const T* in, int64_t in_j, T* out, int64_t out_k, int64_t n) {
  for (int64_t x = 0; x < n; ++x) {
    T v[C], r[R];
    for (int j = 0; j < C; ++j) v[j] = in[x * InX + j * in_j];
    transform<M, R, C, T>(v, r);
    for (int k = 0; k < R; ++k) out[x * OutX + k * out_k] = r[k];
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

// The weight gradient's transforms: the output gradient's A dy A^T (6x6) of dy (4x4), and the
// filter gradient G^T m G (3x3) of the products m (6x6) summed over tiles.
template <typename T>
UNET_HD void grad_tile(const T* dy, T* m) { transform_tile<kA, kIn, kOut>(dy, m); }
template <typename T>
UNET_HD void weight_tile(const T* m, T* dw) { transform_tile<kGT, kKernel, kIn>(m, dw); }

// The 4x4 output tile of the 3x3 correlation of d (6x6) with g (3x3), by Winograd.
template <typename T>
UNET_HD void convolve_tile(const T* d, const T* g, T* y) {
  T u[kPoints], v[kPoints], m[kPoints];
  filter_tile(g, u);
  input_tile(d, v);
  for (int i = 0; i < kPoints; ++i) m[i] = u[i] * v[i];
  output_tile(m, y);
}

// One tile's weight gradient, F(3x3, 4x4): dw[ky][kx] = sum_ij dy[i][j] d[i + ky][j + kx] for the
// 6x6 input d and the 4x4 output gradient dy is G^T [(A dy A^T) . (B^T d B)] G, the transpose of
// convolve_tile in the filter (y = A^T [(G g G^T) . V] A is linear in g).
template <typename T>
UNET_HD void weight_gradient_tile(const T* d, const T* dy, T* dw) {
  T v[kPoints], m[kPoints];
  input_tile(d, v);
  grad_tile(dy, m);
  for (int i = 0; i < kPoints; ++i) m[i] *= v[i];
  weight_tile(m, dw);
}

}  // namespace winograd
}  // namespace unet_ext
