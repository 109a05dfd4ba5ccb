// weighted_cross_entropy forward on the CPU: float32 logits (N, C, H, W) contiguous, int64 target,
// float32 weight map, ignore_index -100, mean reduction. Out: the per-pixel logsumexp (N, S) and
// sums[0] = sum of w * (lse - logit[t]), sums[1] = the mean's denominator (pixels not ignored).
// Torch-free: dev/harness.py builds it with the library's C++ flags into a plain shared library
// (seconds) and dev/loss.py validates every variant against unet_ext.reference before timing it.
//   v1  per pixel, classes strided by S (the textbook loop), std::exp / std::log
//   v2  the library's kernel (weighted_cross_entropy_block.h, as built): blocks of B pixels
//       gathered into a (C, B) buffer, two-pass logsumexp, the library's vexp/vlog polynomials
//   v3  v2 with block_logsumexp_online (one pass over the classes, two exps per logit)
//   v4  v2 without the gather: float32 NCHW rows are read in place (row stride S)
// Parameter: B (pixels per block; the library's kMaxBlock, 256, for C <= 64). Blocks are shared
// by threads statically; each block's sums are stored and added in order (deterministic).
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <vector>

#if defined(DEV_ISA_AVX2)
#pragma GCC target("avx2,fma,bmi,bmi2,f16c")
#define UNET_CPU_ISA avx2
#define UNET_CPU_VECTOR_FLOOR 1
#elif defined(__x86_64__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi,bmi2,f16c")
#define UNET_CPU_ISA avx512
#define UNET_CPU_VECTOR_FLOOR 1
#else
#define UNET_CPU_ISA baseline
#define UNET_CPU_VECTOR_FLOOR 0
#endif
#include "ops/cpu/vec_math.h"
#include "ops/cpu/weighted_cross_entropy_block.h"

namespace {
using namespace unet_ext::wce::UNET_CPU_ISA;
using unet_ext::wce::Geometry;

constexpr int64_t kDevMaxBlock = 4096;  // the sweep's largest B (the library's stack arrays hold kMaxBlock)

Geometry nchw(int64_t n, int64_t c, int64_t s) {
  Geometry g{};
  g.batch = n;
  g.classes = c;
  g.pixels = s;
  g.logits = {c * s, s, 1};
  g.target_n = s;
  g.target_s = 1;
  g.weight_n = s;
  g.weight_s = 1;
  g.ignore_index = -100;
  g.reduction = unet_ext::wce::kMean;
  g.has_weight_map = true;
  g.has_class_weight = false;
  return g;
}

void v1_per_pixel(const Geometry& g, const float* logits, const int64_t* target, const float* weight,
                  int64_t block, float* lse_out, double* block_loss, double* block_weight) {
  const int64_t per_sample = (g.pixels + block - 1) / block, blocks = g.batch * per_sample;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t n = b / per_sample, s0 = (b % per_sample) * block;
    const int64_t end = std::min(g.pixels, s0 + block);
    double loss = 0.0, count = 0.0;
    for (int64_t s = s0; s < end; ++s) {
      const float* x = logits + g.logit_offset(n, 0, s);
      float mx = x[0];
      for (int64_t c = 1; c < g.classes; ++c) mx = std::max(mx, x[c * g.pixels]);
      float sum = 0.f;
      for (int64_t c = 0; c < g.classes; ++c) sum += std::exp(x[c * g.pixels] - mx);
      const float lse = mx + std::log(sum);
      lse_out[n * g.pixels + s] = lse;
      const int64_t t = target[n * g.pixels + s];
      if (t == g.ignore_index) continue;
      loss += weight[n * g.pixels + s] * (lse - x[t * g.pixels]);
      count += 1.0;
    }
    block_loss[b] = loss;
    block_weight[b] = count;
  }
}

template <int kVariant>
void blocked(const Geometry& g, const float* logits, const int64_t* target, const float* weight,
             int64_t block, float* lse_out, double* block_loss, double* block_weight) {
  const int64_t per_sample = (g.pixels + block - 1) / block, blocks = g.batch * per_sample;
#pragma omp parallel
  {
    std::vector<float> buffer(kVariant == 4 ? 0 : g.classes * block);
    int32_t cls[kDevMaxBlock];
    float loss[kDevMaxBlock];
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t n = b / per_sample, s0 = (b % per_sample) * block;
      const int64_t len = std::min(block, g.pixels - s0);
      int64_t bad = 0;
      load_classes(g, target, n, s0, len, cls, &bad);  // targets are valid here
      const float* buf = buffer.data();
      int64_t stride = block;
      if constexpr (kVariant == 4) {
        buf = logits + g.logit_offset(n, 0, s0);
        stride = g.logits.c;
      } else {
        gather_logits(g, logits, n, s0, len, block, buffer.data());
      }
      float* lse = lse_out + n * g.pixels + s0;
      if constexpr (kVariant == 3) {
        forward_block<float, kDevMaxBlock, block_logsumexp_online<float, kDevMaxBlock>>(
            g, weight, nullptr, n, s0, len, stride, cls, buf, lse, loss, &block_loss[b], &block_weight[b]);
      } else {
        forward_block<float, kDevMaxBlock, block_logsumexp_two_pass<float, kDevMaxBlock>>(
            g, weight, nullptr, n, s0, len, stride, cls, buf, lse, loss, &block_loss[b], &block_weight[b]);
      }
    }
  }
}

}  // namespace

extern "C" int64_t dev_max_block() { return kDevMaxBlock; }
extern "C" int64_t library_block(int64_t classes) { return block_pixels(classes); }

// Returns 0, or -1 for an unknown variant or a block out of range.
extern "C" int wce_forward(int variant, const float* logits, const int64_t* target, const float* weight,
                           int64_t n, int64_t c, int64_t s, int64_t block, int threads, float* lse,
                           double* sums) {
  if (block < 1 || block > kDevMaxBlock) return -1;
  omp_set_num_threads(threads);
  const Geometry g = nchw(n, c, s);
  const int64_t blocks = n * ((s + block - 1) / block);
  std::vector<double> loss(blocks), weight_sum(blocks);
  switch (variant) {
    case 1: v1_per_pixel(g, logits, target, weight, block, lse, loss.data(), weight_sum.data()); break;
    case 2: blocked<2>(g, logits, target, weight, block, lse, loss.data(), weight_sum.data()); break;
    case 3: blocked<3>(g, logits, target, weight, block, lse, loss.data(), weight_sum.data()); break;
    case 4: blocked<4>(g, logits, target, weight, block, lse, loss.data(), weight_sum.data()); break;
    default: return -1;
  }
  sums[0] = sums[1] = 0.0;
  for (int64_t b = 0; b < blocks; ++b) {
    sums[0] += loss[b];
    sums[1] += weight_sum[b];
  }
  return 0;
}
