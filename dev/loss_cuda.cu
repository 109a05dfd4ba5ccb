// weighted_cross_entropy forward on CUDA, the same problem as loss_cpu.cpp: float32 logits
// (N, C, H, W) contiguous, int64 target, float32 weight map, ignore_index -100, mean. Out: lse
// (N, S) and sums[0] = sum of w * (lse - logit[t]), sums[1] = pixels not ignored (double; the
// caller zeroes sums). Built by dev/harness.py with nvcc into a plain shared library, run on the
// GPU lease (dev/README.md); every variant is validated against unet_ext.reference first.
//   v1  one thread per pixel, two passes over the classes, one double atomicAdd per pixel
//   v2  one thread per pixel, the library's online recurrence (wce::logsumexp_update, shared with
//       csrc/ops/cuda/weighted_cross_entropy.cu), block reduction in shared memory, one atomic per block
//   v3  v2 over a grid-stride loop on a grid capped at 4096 blocks (the library's kMaxForwardBlocks)
// Parameter: threads per block (the library's kThreads, 256).
#include <cuda_runtime.h>

#include <cstdint>

#include "ops/weighted_cross_entropy.h"

namespace {

constexpr int kLibraryThreads = 256;  // csrc/ops/cuda/weighted_cross_entropy.cu's kThreads
constexpr int64_t kMaxBlocks = 4096;

struct Pixel {
  double loss, weight;
};

__device__ __forceinline__ Pixel pixel_loss(const float* logits, const int64_t* target, const float* weight,
                                            int64_t c_count, int64_t s_count, int64_t i, float* lse_out,
                                            bool online) {
  const int64_t n = i / s_count, s = i % s_count;
  const float* x = logits + n * c_count * s_count + s;
  float mx = x[0], sum = 1.f;
  if (online) {
    for (int64_t c = 1; c < c_count; ++c) {
      unet_ext::wce::logsumexp_update(mx, sum, __ldg(x + c * s_count), [](float v) { return expf(v); });
    }
  } else {
    for (int64_t c = 1; c < c_count; ++c) mx = fmaxf(mx, x[c * s_count]);
    sum = 0.f;
    for (int64_t c = 0; c < c_count; ++c) sum += expf(x[c * s_count] - mx);
  }
  const float lse = mx + logf(sum);
  lse_out[i] = lse;
  const int64_t t = target[i];
  if (t == -100) return {0.0, 0.0};
  return {static_cast<double>(weight[i] * (lse - x[t * s_count])), 1.0};
}

__global__ void v1_kernel(const float* logits, const int64_t* target, const float* weight, int64_t c_count,
                          int64_t s_count, int64_t pixels, float* lse, double* sums) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= pixels) return;
  const Pixel p = pixel_loss(logits, target, weight, c_count, s_count, i, lse, false);
  if (p.weight != 0.0) {
    atomicAdd(&sums[0], p.loss);
    atomicAdd(&sums[1], p.weight);
  }
}

__device__ __forceinline__ void block_add(double loss, double weight, double* sums) {
  __shared__ double shared[2][32];
  for (int offset = 16; offset > 0; offset /= 2) {
    loss += __shfl_down_sync(0xffffffffu, loss, offset);
    weight += __shfl_down_sync(0xffffffffu, weight, offset);
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
  if (lane == 0) {
    shared[0][warp] = loss;
    shared[1][warp] = weight;
  }
  __syncthreads();
  if (warp == 0) {
    loss = lane < warps ? shared[0][lane] : 0.0;
    weight = lane < warps ? shared[1][lane] : 0.0;
    for (int offset = 16; offset > 0; offset /= 2) {
      loss += __shfl_down_sync(0xffffffffu, loss, offset);
      weight += __shfl_down_sync(0xffffffffu, weight, offset);
    }
    if (lane == 0) {
      atomicAdd(&sums[0], loss);
      atomicAdd(&sums[1], weight);
    }
  }
}

template <bool kGridStride>
__global__ void v23_kernel(const float* logits, const int64_t* target, const float* weight, int64_t c_count,
                           int64_t s_count, int64_t pixels, float* lse, double* sums) {
  double loss = 0.0, count = 0.0;
  const int64_t step = kGridStride ? static_cast<int64_t>(gridDim.x) * blockDim.x : pixels;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < pixels; i += step) {
    const Pixel p = pixel_loss(logits, target, weight, c_count, s_count, i, lse, true);
    loss += p.loss;
    count += p.weight;
  }
  block_add(loss, count, sums);
}

}  // namespace

extern "C" int library_threads() { return kLibraryThreads; }

// Returns 0, or -1 (unknown variant, bad threads), or the CUDA error of the launch.
extern "C" int wce_forward_cuda(int variant, const float* logits, const int64_t* target, const float* weight,
                                int64_t n, int64_t c, int64_t s, int threads, float* lse, double* sums) {
  if (threads < 32 || threads > 1024 || threads % 32) return -1;
  const int64_t pixels = n * s, needed = (pixels + threads - 1) / threads;
  cudaMemsetAsync(sums, 0, 2 * sizeof(double));
  switch (variant) {
    case 1: v1_kernel<<<static_cast<unsigned>(needed), threads>>>(logits, target, weight, c, s, pixels, lse, sums); break;
    case 2: v23_kernel<false><<<static_cast<unsigned>(needed), threads>>>(logits, target, weight, c, s, pixels, lse, sums); break;
    case 3: {
      const int64_t blocks = needed < kMaxBlocks ? needed : kMaxBlocks;
      v23_kernel<true><<<static_cast<unsigned>(blocks), threads>>>(logits, target, weight, c, s, pixels, lse, sums);
      break;
    }
    default: return -1;
  }
  return static_cast<int>(cudaGetLastError());
}
