// Deterministic block-wide sum for the conv weight-gradient kernels: each thread's partial
// goes through a fixed shuffle tree per warp, then warp 0 adds the warps in index order, so a
// given launch configuration always adds the same values in the same order (no atomics).
#pragma once

template <typename acc_t, int kThreads>
__device__ __forceinline__ acc_t block_sum(acc_t v, acc_t* shared /* kThreads / 32 */) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "whole warps");
  constexpr int kWarps = kThreads / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  acc_t total = acc_t(0);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += shared[w];
  }
  __syncthreads();  // `shared` is reused by the caller's next element
  return total;     // valid in thread 0 only
}
