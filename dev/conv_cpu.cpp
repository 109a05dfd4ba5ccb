// conv2d_relu forward on the CPU: float32 NCHW input (N, Ci, H, W), weight (Co, Ci, K, K), bias (Co),
// stride 1, no padding ("valid", U-Net's): y = relu(conv(x, w) + b), (N, Co, H-K+1, W-K+1).
// Torch-free: dev/harness.py builds it with the library's C++ flags; dev/conv.py validates each
// variant against unet_ext.reference.conv2d_relu before timing it, next to the library's op
// (blocked implicit GEMM on oneDNN's brgemm, csrc/ops/cpu/conv2d_kernel.h) and stock PyTorch.
//   v1  direct, one output at a time (7 nested loops; the sum over ci, ky, kx innermost)
//   v2  direct, one output row at a time: the row's accumulators in a buffer, the input row read
//       at unit stride (the inner loop vectorises)
//   v3  v2 tiled: a task owns TCO output channels x R output rows; each input row is loaded once
//       for TCO channels (register/L1 reuse), the weights of the tile once per row block
// Parameters: v3's tile, TCO (output channels) x R (rows), swept by dev/conv.py as TCOxR.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(DEV_ISA_AVX2)
#pragma GCC target("avx2,fma")
#elif defined(__x86_64__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
#endif

namespace {

struct Shape {
  int64_t n, ci, h, w, co, k, oh, ow;
};

void v1_naive(const Shape& s, const float* x, const float* wt, const float* b, float* y) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t n = 0; n < s.n; ++n) {
    for (int64_t co = 0; co < s.co; ++co) {
      for (int64_t oh = 0; oh < s.oh; ++oh) {
        for (int64_t ow = 0; ow < s.ow; ++ow) {
          float acc = b[co];
          for (int64_t ci = 0; ci < s.ci; ++ci) {
            const float* xin = x + ((n * s.ci + ci) * s.h + oh) * s.w + ow;
            const float* wk = wt + (co * s.ci + ci) * s.k * s.k;
            for (int64_t ky = 0; ky < s.k; ++ky)
              for (int64_t kx = 0; kx < s.k; ++kx) acc += xin[ky * s.w + kx] * wk[ky * s.k + kx];
          }
          y[((n * s.co + co) * s.oh + oh) * s.ow + ow] = acc > 0.f ? acc : 0.f;
        }
      }
    }
  }
}

// acc[r][0, ow) += sum over ci, ky, kx of w[co, ci, ky, kx] * x[ci, oh0 + r + ky, kx + ...] for
// TCO channels: the tile's inner loop is unit stride over the output row.
void tile(const Shape& s, const float* x, const float* wt, int64_t n, int64_t co0, int64_t tco, int64_t oh0,
          int64_t rows, float* acc) {
  for (int64_t ci = 0; ci < s.ci; ++ci) {
    const float* plane = x + (n * s.ci + ci) * s.h * s.w;
    for (int64_t c = 0; c < tco; ++c) {
      const float* wk = wt + ((co0 + c) * s.ci + ci) * s.k * s.k;
      for (int64_t r = 0; r < rows; ++r) {
        float* out = acc + (c * rows + r) * s.ow;
        for (int64_t ky = 0; ky < s.k; ++ky) {
          const float* in = plane + (oh0 + r + ky) * s.w;
          for (int64_t kx = 0; kx < s.k; ++kx) {
            const float wv = wk[ky * s.k + kx];
            const float* src = in + kx;
            for (int64_t ow = 0; ow < s.ow; ++ow) out[ow] += wv * src[ow];
          }
        }
      }
    }
  }
}

void tiled(const Shape& s, const float* x, const float* wt, const float* b, float* y, int64_t tco, int64_t rows) {
  const int64_t co_tiles = (s.co + tco - 1) / tco, row_tiles = (s.oh + rows - 1) / rows;
  const int64_t tasks = s.n * co_tiles * row_tiles;
#pragma omp parallel
  {
    std::vector<float> acc(tco * rows * s.ow);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t n = t / (co_tiles * row_tiles), rest = t % (co_tiles * row_tiles);
      const int64_t co0 = (rest / row_tiles) * tco, oh0 = (rest % row_tiles) * rows;
      const int64_t tc = std::min(tco, s.co - co0), tr = std::min(rows, s.oh - oh0);
      for (int64_t c = 0; c < tc; ++c)
        std::fill(acc.begin() + c * tr * s.ow, acc.begin() + (c + 1) * tr * s.ow, b[co0 + c]);
      tile(s, x, wt, n, co0, tc, oh0, tr, acc.data());
      for (int64_t c = 0; c < tc; ++c) {
        for (int64_t r = 0; r < tr; ++r) {
          const float* src = acc.data() + (c * tr + r) * s.ow;
          float* dst = y + ((n * s.co + co0 + c) * s.oh + oh0 + r) * s.ow;
          for (int64_t ow = 0; ow < s.ow; ++ow) dst[ow] = src[ow] > 0.f ? src[ow] : 0.f;
        }
      }
    }
  }
}

}  // namespace

// Returns 0, or -1 for an unknown variant or a bad tile.
extern "C" int conv_forward(int variant, const float* x, const float* w, const float* b, float* y, int64_t n,
                            int64_t ci, int64_t h, int64_t wd, int64_t co, int64_t k, int64_t tco, int64_t rows,
                            int threads) {
  if (tco < 1 || rows < 1 || k > h || k > wd) return -1;
  omp_set_num_threads(threads);
  const Shape s{n, ci, h, wd, co, k, h - k + 1, wd - k + 1};
  switch (variant) {
    case 1: v1_naive(s, x, w, b, y); break;
    case 2: tiled(s, x, w, b, y, 1, 1); break;
    case 3: tiled(s, x, w, b, y, tco, rows); break;
    default: return -1;
  }
  return 0;
}
