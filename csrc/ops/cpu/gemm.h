// Row-major GEMM on per-thread blocks for the CPU conv kernels: C[M,N] = A[M,K] B[K,N]
// (+ C when accumulate). float goes to oneDNN's brgemm micro-kernel through ATen (no dispatcher
// or tensor overhead per block, and faster than MKL's sgemm on this project's AMD CI cores);
// other dtypes, and torch builds without brgemm, use at::mm_out on views of the same memory.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <vector>

namespace unet_ext {
namespace cpu {

// Whether ATen's float brgemm works here (probed once: it throws where oneDNN lacks it).
inline bool float_brgemm_available() {
  static const bool available = [] {
    try {
      float a[4] = {1, 2, 3, 4}, b[4] = {1, 0, 0, 1}, c[4] = {0, 0, 0, 0};
      at::native::cpublas::brgemm(2, 2, 2, 2, 2, 2, false, a, b, c, false);
      at::native::cpublas::brgemm_release(false);
      return c[0] == 1 && c[1] == 2 && c[2] == 3 && c[3] == 4;
    } catch (const c10::Error&) {
      return false;
    }
  }();
  return available;
}

template <typename T>
void gemm_with_mm(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb,
                  T* c, int64_t ldc, bool accumulate) {
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor A = at::from_blob(const_cast<T*>(a), {m, k}, {lda, 1}, options);
  at::Tensor B = at::from_blob(const_cast<T*>(b), {k, n}, {ldb, 1}, options);
  at::Tensor C = at::from_blob(c, {m, n}, {ldc, 1}, options);
  if (accumulate) {
    C.addmm_(A, B);
  } else {
    at::mm_out(C, A, B);
  }
}

// Up to these sizes the micro-kernel (it does no cache blocking of its own: blocked here above
// kBrgemmPlain elements of A) beats MKL; the deep layers' long-K GEMMs (K = 9 * C_in up to 9216)
// go to MKL, which packs its operands.
constexpr int64_t kBrgemmMaxK = 2048, kBrgemmMaxM = 2048, kBrgemmPlain = 256 * 512;

inline void gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                 int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (!accumulate) for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, 0.0f);
    return;
  }
  if (float_brgemm_available() && k <= kBrgemmMaxK && m <= kBrgemmMaxM) {
    if (m * k <= kBrgemmPlain) {
      at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, a, b, c, false);
      return;
    }
    // Larger A (512-channel layers): blocks of B stay in L2 while the M panels go by; blocks split
    // each dimension evenly (a 512 + 26 split would run a whole A panel for 26 columns).
    const auto even = [](int64_t size, int64_t target) {
      const int64_t parts = (size + target - 1) / target;
      return (size + parts - 1) / parts;
    };
    const int64_t block_m = even(m, 128), block_n = even(n, 256), block_k = even(k, 256);
    for (int64_t n0 = 0; n0 < n; n0 += block_n) {
      const int64_t nb = std::min(block_n, n - n0);
      for (int64_t k0 = 0; k0 < k; k0 += block_k) {
        const int64_t kb = std::min(block_k, k - k0);
        for (int64_t m0 = 0; m0 < m; m0 += block_m) {
          const int64_t mb = std::min(block_m, m - m0);
          at::native::cpublas::brgemm(mb, nb, kb, lda, ldb, ldc, accumulate || k0 > 0,
                                      a + m0 * lda + k0, b + k0 * ldb + n0, c + m0 * ldc + n0, false);
        }
      }
    }
  } else {
    gemm_with_mm(m, n, k, a, lda, b, ldb, c, ldc, accumulate);
  }
}

inline void gemm(int64_t m, int64_t n, int64_t k, const double* a, int64_t lda, const double* b,
                 int64_t ldb, double* c, int64_t ldc, bool accumulate) {
  if (m == 0 || n == 0) return;
  gemm_with_mm(m, n, k, a, lda, b, ldb, c, ldc, accumulate);
}

// dst[cols, rows] = src[rows, cols]^T in 16x16 tiles: both sides stay within a few cache lines
// per tile (a plain loop writes one new line per element on one side).
// Parallel over row tiles when large (the deep layers' 37 MB weights); serial inside a parallel
// region, as every at::parallel_for is.
template <typename T>
void transpose(const T* src, int64_t rows, int64_t cols, T* dst) {
  constexpr int64_t kTile = 16;
  const int64_t row_tiles = (rows + kTile - 1) / kTile;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, kTile * cols));
  at::parallel_for(0, row_tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t i0 = t0 * kTile; i0 < std::min(rows, t1 * kTile); i0 += kTile) {
      const int64_t i1 = std::min(rows, i0 + kTile);
      for (int64_t j0 = 0; j0 < cols; j0 += kTile) {
        const int64_t j1 = std::min(cols, j0 + kTile);
        for (int64_t i = i0; i < i1; ++i)
          for (int64_t j = j0; j < j1; ++j) dst[j * rows + i] = src[i * cols + j];
      }
    }
  });
}

// Per-thread scratch that outlives the call: a fresh multi-MiB buffer per call costs a page fault
// per 4 KiB here (U-Net's deep layers gather ~30 MiB of shifted rows per block). Grows, never
// shrinks; `slot` tells apart the buffers one task holds at once. Contents are undefined.
template <typename T>
std::vector<T>* scratch_buffers() {
  thread_local std::vector<T> buffers[4];
  return buffers;
}

template <typename T>
T* scratch(int slot, int64_t size) {
  std::vector<T>& buffer = scratch_buffers<T>()[slot];
  if (static_cast<int64_t>(buffer.size()) < size) {
    buffer = std::vector<T>();  // free first: old and new are not needed at once
    buffer.resize(size);
  }
  return buffer.data();
}

// Frees the calling thread's scratch (unet_ext.empty_cache runs it on every OpenMP thread).
inline void release_scratch() {
  for (int slot = 0; slot < 4; ++slot) {
    scratch_buffers<float>()[slot] = std::vector<float>();
    scratch_buffers<double>()[slot] = std::vector<double>();
  }
}

// Call at the end of each parallel task that used gemm (frees the brgemm's per-thread state).
inline void gemm_release() {
  if (float_brgemm_available()) at::native::cpublas::brgemm_release(false);
}

}  // namespace cpu
}  // namespace unet_ext
