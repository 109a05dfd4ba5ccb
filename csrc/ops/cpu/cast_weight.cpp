// _cast_weight on the CPU: a convolution weight in another dtype and memory format in one pass.
// Under CPU bf16 autocast the convolutions' float32 NCHW weights go to oneDNN as bf16 channels_last
// ([C_out][kh][kw][C_in], the layout its nhwc convolutions want; an NCHW weight is cloned to it in
// the forward and again in the backward), and the channels_last bf16 weight gradient comes back
// as float32 NCHW: both are a [A][B][K] <-> [A][K][B] transpose per A with the cast folded in.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <torch/csrc/autograd/custom_function.h>

#include "cpu_isa.h"

#include "huge_pages.h"

namespace unet_ext {
namespace cpu {
namespace {

// d[c][r] = s[r][c] for r0 <= r < rows, c0 <= c < cols, cast to dst_t. A [rows][cols] block is a
// few KiB (C_in x 9 values), so the strided side stays in L1.
template <typename src_t, typename dst_t>
void transpose_cast_block(const src_t* s, dst_t* d, int64_t rows, int64_t cols, int64_t r0, int64_t c0) {
  for (int64_t c = c0; c < cols; ++c) {
    for (int64_t r = r0; r < rows; ++r) d[c * rows + r] = static_cast<dst_t>(s[r * cols + c]);
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// GCC 12 reports the intrinsics' own _mm512_undefined_* placeholders as maybe uninitialised.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#define UNET_CAST_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
// float32 [B][K] -> bf16 [K][B] (to_last) and bf16 [K][B] -> float32 [B][K] (to_first), 16 of B at a
// time: gathers from the L1-resident block, c10's rounding (to nearest even; NaN -> 0x7FC0), the
// rest of B by the scalar loop. A scalar element-by-element transpose runs at ~1.3 cycles per
// element, 2-4x a contiguous cast.
UNET_CAST_AVX512 int64_t to_last_avx512(const float* s, at::BFloat16* d, int64_t b, int64_t k, int64_t c) {
  const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32(static_cast<int>(k)));
  for (; c + 16 <= b; c += 16) {
    for (int64_t t = 0; t < k; ++t) {
      const __m512 v = _mm512_i32gather_ps(idx, s + c * k + t, 4);
      const __m512i u = _mm512_castps_si512(v);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
      __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
      r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + t * b + c), _mm512_cvtepi32_epi16(r));
    }
  }
  return c;
}

UNET_CAST_AVX512 int64_t to_first_avx512(const at::BFloat16* s, float* d, int64_t b, int64_t k, const int32_t* idx,
                                         float* tmp, int64_t c) {
  for (; c + 16 <= b; c += 16) {
    for (int64_t t = 0; t < k; ++t) {  // tmp[t][j] = s[t][c + j]
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + t * b + c));
      _mm512_storeu_ps(tmp + 16 * t, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
    }
    for (int64_t v = 0; v < k; ++v) {  // d[c + j][t] = tmp[t][j], 16 outputs a vector
      _mm512_storeu_ps(d + c * k + 16 * v,
                       _mm512_i32gather_ps(_mm512_loadu_si512(idx + 16 * v), tmp, 4));
    }
  }
  return c;
}

// 32 of B at a time without gathers (Zen 4 gathers 16 floats in ~1.5 cycles an element; a
// contiguous cast takes a third of the transposing one): the 32 x k block is k vectors of 32
// bf16, and each output vector is ceil(k / 2) two-source word permutes (vpermt2w) of them, merged
// by mask. 512 x 512 x 3 x 3 on 2 threads: to_last 0.56-0.84 -> 0.34-0.50 ms, to_first 0.53-0.75 ->
// 0.29-0.42 ms (a plain cast: 0.12-0.18 ms).
constexpr int64_t kTileMaxTaps = 16;
struct TilePermutes {
  int64_t pairs = 0;
  std::vector<uint16_t> idx;   // [k][pairs][32] lane indices into source vectors 2q, 2q + 1
  std::vector<uint32_t> mask;  // [k][pairs] lanes taken from that pair
};

// Output word p of the tile (vector p / 32, lane p % 32) comes from source word src(p): to_last
// reads [32][k] floats and writes [k][32]; to_first reads [k][32] and writes [32][k].
TilePermutes tile_permutes(int64_t k, bool to_last) {
  TilePermutes t;
  t.pairs = (k + 1) / 2;
  t.idx.assign(k * t.pairs * 32, 0);
  t.mask.assign(k * t.pairs, 0);
  for (int64_t p = 0; p < 32 * k; ++p) {
    const int64_t o = p / 32, lane = p % 32;
    const int64_t src = to_last ? lane * k + o : (p % k) * 32 + p / k;
    const int64_t slot = o * t.pairs + src / 64;
    t.idx[slot * 32 + lane] = static_cast<uint16_t>(src % 64);
    t.mask[slot] |= uint32_t{1} << lane;
  }
  return t;
}

// c10's float -> bf16 rounding (to nearest even; NaN -> 0x7FC0) of 16 floats.
UNET_CAST_AVX512 inline __m256i round_bf16x16(const float* p) {
  const __m512 v = _mm512_loadu_ps(p);
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

UNET_CAST_AVX512 inline __m512i permute_tile(const __m512i* tile, const TilePermutes& perm, int64_t o) {
  __m512i acc = _mm512_setzero_si512();
  for (int64_t q = 0; q < perm.pairs; ++q) {
    const __mmask32 m = perm.mask[o * perm.pairs + q];
    if (m == 0) continue;
    const __m512i idx = _mm512_loadu_si512(perm.idx.data() + (o * perm.pairs + q) * 32);
    acc = _mm512_mask_mov_epi16(acc, m, _mm512_permutex2var_epi16(tile[2 * q], idx, tile[2 * q + 1]));
  }
  return acc;
}

// float [B][k] -> bf16 [k][B], 32 of B at a time (k <= kTileMaxTaps); returns how many of B it did.
UNET_CAST_AVX512 int64_t to_last_tiles(const float* s, at::BFloat16* d, int64_t b, int64_t k,
                                       const TilePermutes& perm) {
  __m512i tile[kTileMaxTaps + 1];
  tile[k] = _mm512_setzero_si512();  // the odd k's last pair reads one past the block
  int64_t c = 0;
  for (; c + 32 <= b; c += 32) {
    const float* src = s + c * k;
    for (int64_t v = 0; v < k; ++v) {
      tile[v] = _mm512_inserti64x4(_mm512_castsi256_si512(round_bf16x16(src + 32 * v)),
                                   round_bf16x16(src + 32 * v + 16), 1);
    }
    for (int64_t o = 0; o < k; ++o) _mm512_storeu_si512(d + o * b + c, permute_tile(tile, perm, o));
  }
  return c;
}

// bf16 [k][B] -> float [B][k], 32 of B at a time (k <= kTileMaxTaps); returns how many of B it did.
UNET_CAST_AVX512 int64_t to_first_tiles(const at::BFloat16* s, float* d, int64_t b, int64_t k,
                                        const TilePermutes& perm) {
  __m512i tile[kTileMaxTaps + 1];
  tile[k] = _mm512_setzero_si512();
  int64_t c = 0;
  for (; c + 32 <= b; c += 32) {
    for (int64_t t = 0; t < k; ++t) tile[t] = _mm512_loadu_si512(s + t * b + c);
    float* dst = d + c * k;
    for (int64_t o = 0; o < k; ++o) {
      const __m512i w = permute_tile(tile, perm, o);
      _mm512_storeu_ps(dst + 32 * o,
                       _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(w)), 16)));
      _mm512_storeu_ps(dst + 32 * o + 16, _mm512_castsi512_ps(_mm512_slli_epi32(
                                              _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(w, 1)), 16)));
    }
  }
  return c;
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

bool avx512() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  return best_isa() == Isa::kAvx512;
#else
  return false;
#endif
}

// The 32-wide permute tiles up to kTileMaxTaps taps; UNET_EXT_CAST_TILES=0 keeps the 16-wide
// gathers (read per call: an A/B knob for benchmarks).
bool use_tiles(int64_t taps) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  const char* value = std::getenv("UNET_EXT_CAST_TILES");
  return taps <= kTileMaxTaps && (value == nullptr || std::atoi(value) != 0);
#else
  return false;
#endif
}

// float32 [outer][inner][taps] -> bf16 [outer][taps][inner].
void cast_to_last(const float* src, at::BFloat16* dst, int64_t outer, int64_t inner, int64_t taps) {
  const int64_t block = inner * taps;
  const bool vector = avx512();
  const bool tiles = vector && use_tiles(taps);
  const TilePermutes perm = tiles ? tile_permutes(taps, true) : TilePermutes();
  at::parallel_for(0, outer, std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, block)),
                   [&](int64_t a0, int64_t a1) {
    for (int64_t a = a0; a < a1; ++a) {
      int64_t done = 0;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
      if (tiles) done = to_last_tiles(src + a * block, dst + a * block, inner, taps, perm);
      if (vector) done = to_last_avx512(src + a * block, dst + a * block, inner, taps, done);
#endif
      transpose_cast_block(src + a * block, dst + a * block, inner, taps, done, 0);
    }
  });
}

// bf16 [outer][taps][inner] -> float32 [outer][inner][taps].
void cast_to_first(const at::BFloat16* src, float* dst, int64_t outer, int64_t inner, int64_t taps) {
  const int64_t block = inner * taps;
  const bool vector = avx512();
  // Output element p of a 16-wide chunk (16 x taps floats) is tmp[p % taps][p / taps].
  std::vector<int32_t> idx(16 * taps);
  for (int64_t p = 0; p < 16 * taps; ++p) idx[p] = static_cast<int32_t>((p % taps) * 16 + p / taps);
  const bool tiles = vector && use_tiles(taps);
  const TilePermutes perm = tiles ? tile_permutes(taps, false) : TilePermutes();
  at::parallel_for(0, outer, std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, block)),
                   [&](int64_t a0, int64_t a1) {
    std::vector<float> tmp(vector ? 16 * taps : 0);
    for (int64_t a = a0; a < a1; ++a) {
      int64_t done = 0;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
      if (tiles) done = to_first_tiles(src + a * block, dst + a * block, inner, taps, perm);
      if (vector) done = to_first_avx512(src + a * block, dst + a * block, inner, taps, idx.data(), tmp.data(), done);
#endif
      transpose_cast_block(src + a * block, dst + a * block, taps, inner, 0, done);
    }
  });
}

at::Tensor cast_weight_cpu(const at::Tensor& weight, at::ScalarType dtype, at::MemoryFormat format) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  TORCH_CHECK(format == at::MemoryFormat::Contiguous || (format == at::MemoryFormat::ChannelsLast && weight.dim() == 4),
              "unet_ext._cast_weight: memory_format must be contiguous_format, or channels_last for a 4-D weight, got ",
              format, " for ", weight.dim(), "-D");
  at::Tensor out = empty_huge(weight.sizes(), weight.options().dtype(dtype), format);
  if (weight.dim() == 4 && weight.numel() > 0) {
    const int64_t outer = weight.size(0), inner = weight.size(1), taps = weight.size(2) * weight.size(3);
    const bool to_last = format == at::MemoryFormat::ChannelsLast && weight.is_contiguous();
    const bool to_first = format == at::MemoryFormat::Contiguous && weight.is_contiguous(at::MemoryFormat::ChannelsLast);
    if (to_last && weight.scalar_type() == at::kFloat && dtype == at::kBFloat16) {
      cast_to_last(weight.const_data_ptr<float>(), out.mutable_data_ptr<at::BFloat16>(), outer, inner, taps);
      return out;
    }
    if (to_first && weight.scalar_type() == at::kBFloat16 && dtype == at::kFloat) {
      cast_to_first(weight.const_data_ptr<at::BFloat16>(), out.mutable_data_ptr<float>(), outer, inner, taps);
      return out;
    }
  }
  return out.copy_(weight);  // any other dtype pair or layout: torch's copy
}

// The autograd of _cast_weight in C++: the gradient goes back to the weight's dtype and layout
// by the same op. (A Python autograd registration cost ~0.1 ms a call, a tenth of the copy's.)
class CastWeight : public torch::autograd::Function<CastWeight> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& weight, at::ScalarType dtype,
                            at::MemoryFormat format) {
    ctx->saved_data["dtype"] = static_cast<int64_t>(weight.scalar_type());
    ctx->saved_data["format"] = static_cast<int64_t>(weight.suggest_memory_format());
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return cast_op().call(weight, dtype, format);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["dtype"].toInt());
    const auto format = static_cast<at::MemoryFormat>(ctx->saved_data["format"].toInt());
    return {grads[0].defined() ? cast_op().call(grads[0], dtype, format) : at::Tensor(), at::Tensor(), at::Tensor()};
  }

 private:
  static const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, at::ScalarType, at::MemoryFormat)>& cast_op() {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("unet_ext::_cast_weight", "")
                               .typed<at::Tensor(const at::Tensor&, at::ScalarType, at::MemoryFormat)>();
    return op;
  }
};

at::Tensor cast_weight_autograd(const at::Tensor& weight, at::ScalarType dtype, at::MemoryFormat format) {
  return CastWeight::apply(weight, dtype, format);
}

}  // namespace
}  // namespace cpu
}  // namespace unet_ext

TORCH_LIBRARY_IMPL(unet_ext, CPU, m) {
  m.impl("_cast_weight", &unet_ext::cpu::cast_weight_cpu);
}

TORCH_LIBRARY_IMPL(unet_ext, Autograd, m) {
  m.impl("_cast_weight", &unet_ext::cpu::cast_weight_autograd);
}
