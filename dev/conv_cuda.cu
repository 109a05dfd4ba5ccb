// conv2d_relu forward on CUDA, the same problem as conv_cpu.cpp: float32 NCHW, weight (Co, Ci, K, K),
// bias, stride 1, valid: y = relu(conv(x, w) + b). Built by dev/harness.py with nvcc, run on the
// GPU lease (dev/README.md); each variant is validated against unet_ext.reference first and timed
// next to the library's op (CUTLASS for fp16/bf16/TF32; the generic kernels for float32).
//   v1  one thread per output, weights and input from global memory (the library's generic
//       float32 kernel's shape of work, csrc/ops/cuda/conv2d_relu.cu)
//   v2  TILE x TILE outputs per block: the (TILE+K-1)^2 input patch of each input channel staged
//       in shared memory, one output channel per block
//   v3  v2 with 4 output channels per thread (the patch reused 4 times from shared memory)
// Parameter: TILE (8, 16 or 32; blocks of TILE^2 threads, v1 too).
#include <cuda_runtime.h>

#include <cstdint>

namespace {

struct Shape {
  int n, ci, h, w, co, k, oh, ow;
};

__global__ void v1_kernel(Shape s, const float* __restrict__ x, const float* __restrict__ wt,
                          const float* __restrict__ b, float* __restrict__ y) {
  const int64_t total = static_cast<int64_t>(s.n) * s.co * s.oh * s.ow;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int ow = i % s.ow, oh = (i / s.ow) % s.oh, co = (i / (static_cast<int64_t>(s.ow) * s.oh)) % s.co;
    const int n = i / (static_cast<int64_t>(s.ow) * s.oh * s.co);
    float acc = b[co];
    for (int ci = 0; ci < s.ci; ++ci) {
      const float* xin = x + ((static_cast<int64_t>(n) * s.ci + ci) * s.h + oh) * s.w + ow;
      const float* wk = wt + (static_cast<int64_t>(co) * s.ci + ci) * s.k * s.k;
      for (int ky = 0; ky < s.k; ++ky)
        for (int kx = 0; kx < s.k; ++kx) acc += __ldg(xin + ky * s.w + kx) * __ldg(wk + ky * s.k + kx);
    }
    y[i] = fmaxf(acc, 0.f);
  }
}

// An explicit minimum of resident blocks: with a bare __launch_bounds__(256), CUDA 13's ptxas
// caps the registers low enough to spill (as the library's kernels note).
template <int kTile, int kCoPerThread>
__global__ void __launch_bounds__(kTile * kTile, kTile == 32 ? 1 : 2) tiled_kernel(Shape s, const float* __restrict__ x,
                                                              const float* __restrict__ wt,
                                                              const float* __restrict__ b, float* __restrict__ y) {
  extern __shared__ float patch[];  // (kTile + K - 1)^2
  const int tiles_w = (s.ow + kTile - 1) / kTile;
  const int oh0 = (blockIdx.x / tiles_w) * kTile, ow0 = (blockIdx.x % tiles_w) * kTile;
  const int co0 = blockIdx.y * kCoPerThread, n = blockIdx.z;
  const int side = kTile + s.k - 1, ty = threadIdx.x / kTile, tx = threadIdx.x % kTile;
  float acc[kCoPerThread];
#pragma unroll
  for (int c = 0; c < kCoPerThread; ++c) acc[c] = co0 + c < s.co ? b[co0 + c] : 0.f;
  for (int ci = 0; ci < s.ci; ++ci) {
    const float* plane = x + (static_cast<int64_t>(n) * s.ci + ci) * s.h * s.w;
    __syncthreads();
    for (int i = threadIdx.x; i < side * side; i += kTile * kTile) {
      const int r = oh0 + i / side, c = ow0 + i % side;
      patch[i] = (r < s.h && c < s.w) ? __ldg(plane + static_cast<int64_t>(r) * s.w + c) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int c = 0; c < kCoPerThread; ++c) {
      if (co0 + c >= s.co) break;
      const float* wk = wt + (static_cast<int64_t>(co0 + c) * s.ci + ci) * s.k * s.k;
      float sum = 0.f;
      for (int ky = 0; ky < s.k; ++ky)
        for (int kx = 0; kx < s.k; ++kx) sum += patch[(ty + ky) * side + tx + kx] * __ldg(wk + ky * s.k + kx);
      acc[c] += sum;
    }
  }
  const int oh = oh0 + ty, ow = ow0 + tx;
  if (oh >= s.oh || ow >= s.ow) return;
#pragma unroll
  for (int c = 0; c < kCoPerThread; ++c) {
    if (co0 + c < s.co) y[((static_cast<int64_t>(n) * s.co + co0 + c) * s.oh + oh) * s.ow + ow] = fmaxf(acc[c], 0.f);
  }
}

template <int kTile, int kCoPerThread>
int launch_tiled(const Shape& s, const float* x, const float* w, const float* b, float* y) {
  const int tiles = ((s.oh + kTile - 1) / kTile) * ((s.ow + kTile - 1) / kTile);
  const dim3 grid(tiles, (s.co + kCoPerThread - 1) / kCoPerThread, s.n);
  const size_t smem = sizeof(float) * (kTile + s.k - 1) * (kTile + s.k - 1);
  tiled_kernel<kTile, kCoPerThread><<<grid, kTile * kTile, smem>>>(s, x, w, b, y);
  return 0;
}

template <int kCoPerThread>
int launch_tile(int tile, const Shape& s, const float* x, const float* w, const float* b, float* y) {
  switch (tile) {
    case 8: return launch_tiled<8, kCoPerThread>(s, x, w, b, y);
    case 16: return launch_tiled<16, kCoPerThread>(s, x, w, b, y);
    case 32: return launch_tiled<32, kCoPerThread>(s, x, w, b, y);
    default: return -1;
  }
}

}  // namespace

// Returns 0, -1 (unknown variant or tile), or the CUDA error of the launch.
extern "C" int conv_forward_cuda(int variant, const float* x, const float* w, const float* b, float* y, int n,
                                 int ci, int h, int wd, int co, int k, int tile) {
  const Shape s{n, ci, h, wd, co, k, h - k + 1, wd - k + 1};
  int rc = -1;
  switch (variant) {
    case 1: {
      if (tile != 8 && tile != 16 && tile != 32) return -1;
      const int64_t total = static_cast<int64_t>(n) * co * s.oh * s.ow;
      const int threads = tile * tile;
      const int64_t blocks = (total + threads - 1) / threads;
      v1_kernel<<<static_cast<unsigned>(blocks < (1 << 20) ? blocks : (1 << 20)), threads>>>(s, x, w, b, y);
      rc = 0;
      break;
    }
    case 2: rc = launch_tile<1>(tile, s, x, w, b, y); break;
    case 3: rc = launch_tile<4>(tile, s, x, w, b, y); break;
  }
  return rc != 0 ? rc : static_cast<int>(cudaGetLastError());
}
