// The bf16 weight gradient of a channels_last convolution on AVX512-BF16 (conv_wgrad_bf16.h).
//
// Why ours: oneDNN's nhwc bf16 weight gradient runs at 55-70% of its own forward rate on this
// project's layers (64 -> 64 at 154x154, batch 2: 14.5 ms against a forward of 8.3 ms; 512 -> 512
// at 14x14: 7.0 against 4.0), the most of any part of the bf16 training step.
//
// dW[co][kh][kw][ci] = sum over output pixels p of g[p][co] * x[p shifted by (kh, kw)][ci]: for
// each kh, one GEMM sums[co][kh][kw * ci + c] += sum over p, K = pixels. vdpbf16ps multiplies
// pairs along K, so both operands are packed as pixel pairs (x, x + 1) of an output row:
//   gv[pair][co][2]           the gradient (a row of an odd width ends with a zero pixel);
//   xv[row][pair][kw * ci][2] each input row the chunk reads, columns kx * ci + c from column
//                             2 pair + kx - pad, so tap kh's operand for a chunk's K pairs is one
//                             dense run starting kh rows on. Columns outside the input (padding)
//                             and beyond the output width are zeros.
// The micro-kernel keeps 2 x 12 vectors of 16 float32 sums (32 columns x 12 output channels) over
// a chunk's K run, loads 2 vectors of xv pairs and broadcasts 12 gv pairs per K pair; the sums are
// the weight's channels_last order, so the result is one dense bf16 conversion.
// Where the sums (co * kh * kw * ci floats) are small, each thread sums its own chunks of rows
// into its own (no synchronisation); else (deep layers: few pixels, many channels) chunks of whole
// images are packed and then multiplied by all threads on disjoint blocks of the sums.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include "conv_wgrad_bf16.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu_isa.h"
#include "huge_pages.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace unet_ext {
namespace conv {

#if defined(__x86_64__)

namespace {

bool cpu_has_avx512_bf16() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
           cpu::best_isa() == cpu::Isa::kAvx512;
  }();
  return has;
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,bmi,bmi2")

constexpr int kLanes = 16;  // float32 sums per vector (output channels)
constexpr int kChannels = 12;  // output channels per micro-kernel call
constexpr int64_t kChunkBytes = 768 * 1024;  // a private chunk's packed operands (L2: 1 MiB)
constexpr int64_t kSharedChunkBytes = int64_t{16} << 20;  // a shared chunk's (UNET_EXT_BF16_WGRAD_CHUNK_BYTES)
constexpr int64_t kPrivateSumFloats = int64_t{1} << 19;  // sums per thread up to 2 MiB
constexpr int64_t kTaskChannels = 48;  // output channels per task in shared chunks

// out[2 i] = a[i], out[2 i + 1] = b[i] for i < n; a or b null: zeros.
inline void interleave_pairs(const uint16_t* a, const uint16_t* b, uint16_t* out, int64_t n) {
  alignas(64) static const uint16_t kLo[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                               8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static const uint16_t kHi[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                               24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i lo = _mm512_load_si512(kLo), hi = _mm512_load_si512(kHi);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512i va = a ? _mm512_loadu_si512(a + i) : _mm512_setzero_si512();
    const __m512i vb = b ? _mm512_loadu_si512(b + i) : _mm512_setzero_si512();
    _mm512_storeu_si512(out + 2 * i, _mm512_permutex2var_epi16(va, lo, vb));
    _mm512_storeu_si512(out + 2 * i + 32, _mm512_permutex2var_epi16(va, hi, vb));
  }
  if (i < n) {
    const int64_t left = n - i;  // 1..31
    const __mmask32 in_mask = _bzhi_u32(0xffffffffu, static_cast<unsigned>(left));
    const __m512i va = a ? _mm512_maskz_loadu_epi16(in_mask, a + i) : _mm512_setzero_si512();
    const __m512i vb = b ? _mm512_maskz_loadu_epi16(in_mask, b + i) : _mm512_setzero_si512();
    const int64_t outs = 2 * left;  // 2..62
    const auto first = static_cast<unsigned>(std::min<int64_t>(outs, 32));
    _mm512_mask_storeu_epi16(out + 2 * i, _bzhi_u32(0xffffffffu, first), _mm512_permutex2var_epi16(va, lo, vb));
    if (outs > 32) {
      _mm512_mask_storeu_epi16(out + 2 * i + 32, _bzhi_u32(0xffffffffu, static_cast<unsigned>(outs - 32)),
                               _mm512_permutex2var_epi16(va, hi, vb));
    }
  }
}

inline __m512 widen(const uint16_t* p, __mmask16 lanes) {  // up to 16 bf16 -> float32 (others 0)
  // The maskz forms: GCC 12 warns of its own _mm512_undefined_epi32 in the plain ones.
  const __m512i wide = _mm512_maskz_cvtepu16_epi32(0xffff, _mm256_maskz_loadu_epi16(lanes, p));
  return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(0xffff, wide, 16));
}

struct Dims {
  int64_t co, ci, kh, kw, columns;  // columns = kw * ci
  int64_t out_h, out_w, in_h, in_w, pad_h, pad_w;
  int64_t pairs;  // per output row: ceil(out_w / 2)
};

struct Part {
  const uint16_t* data;
  int64_t channels, first_channel;
  int64_t image_stride, row_stride, pixel_stride;  // elements
  int64_t top, left;
};

// gv for output rows [y0, y0 + rows) of image n; bias sums (float32) added into bias if non-null.
void pack_gradient(const Dims& d, const uint16_t* grad, int64_t grad_image, int64_t n, int64_t y0, int64_t rows,
                   uint16_t* gv, float* bias) {
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* row = grad + n * grad_image + (y0 + r) * d.out_w * d.co;
    for (int64_t p = 0; p < d.pairs; ++p) {
      const uint16_t* a = row + 2 * p * d.co;
      interleave_pairs(a, 2 * p + 1 < d.out_w ? a + d.co : nullptr, gv + (r * d.pairs + p) * d.co * 2, d.co);
    }
    if (bias != nullptr) {  // a row's sums in registers (through memory, the adds chain on store-to-load)
      for (int64_t c = 0; c < d.co; c += kLanes) {
        const auto left = static_cast<unsigned>(std::min<int64_t>(kLanes, d.co - c));
        const __mmask16 lanes = static_cast<__mmask16>(_bzhi_u32(0xffffu, left));
        __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
        int64_t x = 0;
        for (; x + 1 < d.out_w; x += 2) {
          s0 = _mm512_add_ps(s0, widen(row + x * d.co + c, lanes));
          s1 = _mm512_add_ps(s1, widen(row + (x + 1) * d.co + c, lanes));
        }
        if (x < d.out_w) s0 = _mm512_add_ps(s0, widen(row + x * d.co + c, lanes));
        const __m512 sum = _mm512_add_ps(_mm512_maskz_loadu_ps(lanes, bias + c), _mm512_add_ps(s0, s1));
        _mm512_mask_storeu_ps(bias + c, lanes, sum);
      }
    }
  }
}

// xv row for input row `in_row` (may lie in the padding: zeros) of image n.
void pack_input_row(const Dims& d, const std::vector<Part>& parts, int64_t n, int64_t in_row, uint16_t* xv) {
  const int64_t row_elems = d.pairs * d.columns * 2;
  if (in_row < 0 || in_row >= d.in_h) {
    std::memset(xv, 0, static_cast<size_t>(row_elems) * sizeof(uint16_t));
    return;
  }
  for (int64_t p = 0; p < d.pairs; ++p) {
    for (int64_t kx = 0; kx < d.kw; ++kx) {
      const int64_t col0 = 2 * p + kx - d.pad_w, col1 = col0 + 1;
      const bool in0 = col0 >= 0 && col0 < d.in_w;  // 2 p < out_w always
      const bool in1 = col1 >= 0 && col1 < d.in_w && 2 * p + 1 < d.out_w;
      uint16_t* out = xv + (p * d.columns + kx * d.ci) * 2;
      for (const Part& part : parts) {
        const uint16_t* base = part.data + n * part.image_stride + (part.top + in_row) * part.row_stride;
        interleave_pairs(in0 ? base + (part.left + col0) * part.pixel_stride : nullptr,
                         in1 ? base + (part.left + col1) * part.pixel_stride : nullptr,
                         out + part.first_channel * 2, part.channels);
      }
    }
  }
}

// c[j * ldc + m * 16 + lane] (+)= sum over the segments, and over k < pairs_k in each, of the pair
// products of a and b: a holds pairs of M * 16 columns (stride lda pairs per K pair), b pairs of
// NB output channels (stride ldb pairs per K pair); segment s at a + s * a_stride, b + s * b_stride
// (the images of a shared chunk: one K run each, summed in the same registers). accumulate:
// add to c, else overwrite it.
struct Segments {
  int64_t count, a_stride, b_stride;  // pairs
};

template <int M, int NB>
void micro_kernel(const uint32_t* a, int64_t lda, const uint32_t* b, int64_t ldb, int64_t pairs_k,
                  const Segments& segments, float* c, int64_t ldc, bool accumulate) {
  __m512 acc[M][NB];
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < NB; ++j) {
      acc[m][j] = accumulate ? _mm512_loadu_ps(c + j * ldc + m * kLanes) : _mm512_setzero_ps();
    }
  for (int64_t seg = 0; seg < segments.count; ++seg) {
    const uint32_t* as = a + seg * segments.a_stride;
    const uint32_t* bs = b + seg * segments.b_stride;
    for (int64_t k = 0; k < pairs_k; ++k) {
      __m512bh va[M];
      for (int m = 0; m < M; ++m) va[m] = (__m512bh)_mm512_loadu_si512(as + k * lda + m * kLanes);
      const uint32_t* bk = bs + k * ldb;
      for (int j = 0; j < NB; ++j) {
        const __m512bh vb = (__m512bh)_mm512_set1_epi32(static_cast<int>(bk[j]));
        for (int m = 0; m < M; ++m) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], va[m], vb);
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < NB; ++j) _mm512_storeu_ps(c + j * ldc + m * kLanes, acc[m][j]);
}

template <int M>
void channels_kernel(int nb, const uint32_t* a, int64_t lda, const uint32_t* b, int64_t ldb, int64_t pairs_k,
                     const Segments& segments, float* c, int64_t ldc, bool accumulate) {
  switch (nb) {
#define UNET_WGRAD_CASE(NB) \
  case NB: micro_kernel<M, NB>(a, lda, b, ldb, pairs_k, segments, c, ldc, accumulate); break;
    UNET_WGRAD_CASE(1) UNET_WGRAD_CASE(2) UNET_WGRAD_CASE(3) UNET_WGRAD_CASE(4) UNET_WGRAD_CASE(5)
    UNET_WGRAD_CASE(6) UNET_WGRAD_CASE(7) UNET_WGRAD_CASE(8) UNET_WGRAD_CASE(9) UNET_WGRAD_CASE(10)
    UNET_WGRAD_CASE(11) UNET_WGRAD_CASE(12)
#undef UNET_WGRAD_CASE
    default: TORCH_INTERNAL_ASSERT(false, "bf16 wgrad: ", nb, " channels");
  }
}

// sums[co][ky][column] for co in [co0, co1), columns [n0, n1), over a chunk's segments of pairs_k
// K pairs (gv, xv as packed; segment strides in elements). sums is the weight gradient in float32
// and the weight's channels_last order.
void multiply(const Dims& d, const uint16_t* gv, const uint16_t* xv, int64_t pairs_k, int64_t segments,
              int64_t gv_segment, int64_t xv_segment, int64_t ky, int64_t co0, int64_t co1, int64_t n0, int64_t n1,
              float* sums, bool accumulate) {
  const uint32_t* a = reinterpret_cast<const uint32_t*>(xv) + ky * d.pairs * d.columns;
  const uint32_t* b = reinterpret_cast<const uint32_t*>(gv);
  const Segments seg{segments, xv_segment / 2, gv_segment / 2};
  const int64_t ldc = d.kh * d.columns;
  for (int64_t n = n0; n < n1; n += 2 * kLanes) {
    const bool two = n + 2 * kLanes <= n1;
    for (int64_t co = co0; co < co1; co += kChannels) {
      const int nb = static_cast<int>(std::min<int64_t>(kChannels, co1 - co));
      float* c = sums + co * ldc + ky * d.columns + n;
      if (two) {
        channels_kernel<2>(nb, a + n, d.columns, b + co, d.co, pairs_k, seg, c, ldc, accumulate);
      } else {
        channels_kernel<1>(nb, a + n, d.columns, b + co, d.co, pairs_k, seg, c, ldc, accumulate);
      }
    }
  }
}

#pragma GCC pop_options

}  // namespace

bool use_bf16_wgrad(const ConvGeometry& g) {
  const char* value = std::getenv("UNET_EXT_BF16_WGRAD");  // per call: a knob for tests and benchmarks
  const bool enabled = value == nullptr || std::atoi(value) != 0;
  return enabled && cpu_has_avx512_bf16() && (g.kernel_w * g.in_channels) % kLanes == 0;
}

std::pair<at::Tensor, at::Tensor> bf16_weight_gradient(const ConvGeometry& g, const at::Tensor& grad_arg,
                                                       const std::vector<Bf16WgradPart>& part_args,
                                                       const at::Tensor& weight, std::array<bool, 3> output_mask) {
  TORCH_INTERNAL_ASSERT(use_bf16_wgrad(g) && grad_arg.scalar_type() == at::kBFloat16);
  const at::Tensor grad = grad_arg.contiguous(at::MemoryFormat::ChannelsLast);
  const Dims d{g.out_channels, g.in_channels, g.kernel_h, g.kernel_w, g.kernel_w * g.in_channels,
               g.out_h, g.out_w, g.in_h, g.in_w, g.pad_h, g.pad_w, (g.out_w + 1) / 2};
  std::vector<Part> parts;
  int64_t first = 0;
  for (const Bf16WgradPart& p : part_args) {
    const at::Tensor& t = p.tensor;
    TORCH_INTERNAL_ASSERT(t.scalar_type() == at::kBFloat16 && t.dim() == 4 && t.stride(1) == 1);
    parts.push_back(Part{reinterpret_cast<const uint16_t*>(t.const_data_ptr()), t.size(1), first, t.stride(0),
                         t.stride(2), t.stride(3), p.top, p.left});
    first += t.size(1);
  }
  TORCH_INTERNAL_ASSERT(first == g.in_channels);

  // [co][kh][kw][ci] float32: the weight's channels_last order.
  const int64_t sum_floats = d.co * d.kh * d.columns;
  at::Tensor sums = cpu::empty_huge({d.co, d.kh, d.kw, d.ci}, weight.options().dtype(at::kFloat));
  float* sums_data = sums.mutable_data_ptr<float>();
  std::vector<float> bias(static_cast<size_t>(d.co), 0.0f);
  const uint16_t* gdata = reinterpret_cast<const uint16_t*>(grad.const_data_ptr());
  const int64_t grad_image = d.out_h * d.out_w * d.co;
  const int64_t xv_row = d.pairs * d.columns * 2, gv_row = d.pairs * d.co * 2;  // elements
  const bool want_bias = output_mask[2];
  // Called inside a parallel region (a caller's at::parallel_for), the loops below run inline on
  // this thread, whose number may be any: one slot then.
  const bool nested = at::in_parallel_region();
  const int threads = nested ? 1 : at::get_num_threads();
  const auto slot = [nested] { return nested ? 0 : at::get_thread_num(); };
  std::vector<std::vector<float>> partial_bias(static_cast<size_t>(threads));
  const auto bias_of_thread = [&]() -> float* {
    if (!want_bias) return nullptr;
    std::vector<float>& b = partial_bias[slot()];
    if (b.empty()) b.assign(static_cast<size_t>(d.co), 0.0f);
    return b.data();
  };

  if (g.batch == 0 || d.out_h == 0 || d.out_w == 0) {
    sums.zero_();
  } else if (sum_floats <= kPrivateSumFloats) {
    // Private sums: chunks of rows (all images) split between threads, each summing into its own.
    const int64_t rows = std::clamp<int64_t>(kChunkBytes / ((xv_row + gv_row) * 2) - (d.kh - 1), 1, d.out_h);
    const int64_t chunks_per_image = (d.out_h + rows - 1) / rows, chunks = g.batch * chunks_per_image;
    std::vector<std::vector<float>> partial_sums(static_cast<size_t>(threads));
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float>& own = partial_sums[slot()];
      const bool fresh = own.empty();  // this thread's first range: overwrite, then add
      own.resize(static_cast<size_t>(sum_floats));
      float* bias_sums = bias_of_thread();
      std::vector<uint16_t> gv(static_cast<size_t>(rows * gv_row)), xv(static_cast<size_t>((rows + d.kh - 1) * xv_row));
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        const int64_t n = chunk / chunks_per_image, y0 = (chunk % chunks_per_image) * rows;
        const int64_t r = std::min(rows, d.out_h - y0);
        pack_gradient(d, gdata, grad_image, n, y0, r, gv.data(), bias_sums);
        for (int64_t i = 0; i < r + d.kh - 1; ++i) {
          pack_input_row(d, parts, n, y0 + i - d.pad_h, xv.data() + i * xv_row);
        }
        for (int64_t ky = 0; ky < d.kh; ++ky) {
          multiply(d, gv.data(), xv.data(), r * d.pairs, 1, 0, 0, ky, 0, d.co, 0, d.columns, own.data(),
                   !fresh || chunk > begin);
        }
      }
    });
    bool written = false;
    for (const auto& own : partial_sums) {
      if (own.empty()) continue;
      if (written) {
        for (int64_t i = 0; i < sum_floats; ++i) sums_data[i] += own[i];
      } else {
        std::copy(own.begin(), own.end(), sums_data);
        written = true;
      }
    }
  } else {
    // Shared sums: each chunk (whole images where one fits, else rows of one image) packed by all
    // threads, then multiplied on disjoint blocks of the sums, its images summed in registers.
    const char* knob = std::getenv("UNET_EXT_BF16_WGRAD_CHUNK_BYTES");  // tests: small shapes in several chunks
    const int64_t chunk_bytes = knob != nullptr && std::atoll(knob) > 0 ? std::atoll(knob) : kSharedChunkBytes;
    const int64_t image_bytes = (d.out_h * gv_row + (d.out_h + d.kh - 1) * xv_row) * 2;
    const int64_t images = std::clamp<int64_t>(chunk_bytes / std::max<int64_t>(image_bytes, 1), 1, g.batch);
    const int64_t rows = image_bytes <= chunk_bytes
                             ? d.out_h
                             : std::clamp<int64_t>(chunk_bytes / ((xv_row + gv_row) * 2) - (d.kh - 1), 1, d.out_h);
    const int64_t gv_segment = rows * gv_row, xv_segment = (rows + d.kh - 1) * xv_row;
    std::vector<uint16_t> gv(static_cast<size_t>(images * gv_segment)), xv(static_cast<size_t>(images * xv_segment));
    // Tasks: (ky, block of output channels, block of columns), the columns split only as far as
    // 4 tasks a thread need (each column block reads the gradient's pairs again).
    const int64_t co_blocks = (d.co + kTaskChannels - 1) / kTaskChannels;
    const int64_t split = std::clamp<int64_t>((4 * threads + d.kh * co_blocks - 1) / (d.kh * co_blocks), 1,
                                              (d.columns + 2 * kLanes - 1) / (2 * kLanes));
    const int64_t task_columns = ((d.columns + split - 1) / split + 2 * kLanes - 1) / (2 * kLanes) * (2 * kLanes);
    const int64_t column_blocks = (d.columns + task_columns - 1) / task_columns;
    for (int64_t n0 = 0; n0 < g.batch; n0 += images) {
      const int64_t m = std::min(images, g.batch - n0);
      for (int64_t y0 = 0; y0 < d.out_h; y0 += rows) {
        const int64_t r = std::min(rows, d.out_h - y0), in_rows = r + d.kh - 1;
        at::parallel_for(0, m * (r + in_rows), 1, [&](int64_t begin, int64_t end) {
          float* bias_sums = bias_of_thread();
          for (int64_t i = begin; i < end; ++i) {
            const int64_t image = i / (r + in_rows), j = i % (r + in_rows);
            if (j < r) {
              pack_gradient(d, gdata, grad_image, n0 + image, y0 + j, 1, gv.data() + image * gv_segment + j * gv_row,
                            bias_sums);
            } else {
              pack_input_row(d, parts, n0 + image, y0 + (j - r) - d.pad_h,
                             xv.data() + image * xv_segment + (j - r) * xv_row);
            }
          }
        });
        const bool accumulate = n0 > 0 || y0 > 0;
        at::parallel_for(0, d.kh * co_blocks * column_blocks, 1, [&](int64_t begin, int64_t end) {
          for (int64_t task = begin; task < end; ++task) {
            const int64_t ky = task / (co_blocks * column_blocks), rest = task % (co_blocks * column_blocks);
            const int64_t co0 = (rest / column_blocks) * kTaskChannels, c0 = (rest % column_blocks) * task_columns;
            multiply(d, gv.data(), xv.data(), r * d.pairs, m, gv_segment, xv_segment, ky, co0,
                     std::min(d.co, co0 + kTaskChannels), c0, std::min(d.columns, c0 + task_columns), sums_data,
                     accumulate);
          }
        });
      }
    }
  }
  for (const auto& b : partial_bias) {
    if (b.empty()) continue;
    for (int64_t i = 0; i < d.co; ++i) bias[i] += b[i];
  }

  at::Tensor grad_weight = at::empty({0}, weight.options()), grad_bias = at::empty({0}, weight.options());
  // [co][kh][kw][ci] is the [co][ci][kh][kw] weight in channels_last: one dense conversion.
  if (output_mask[1]) grad_weight = sums.permute({0, 3, 1, 2}).to(weight.scalar_type());
  if (output_mask[2]) grad_bias = at::from_blob(bias.data(), {d.co}, at::kFloat).to(weight.scalar_type());
  return {grad_weight, grad_bias};
}

#else  // not x86-64: never taken

bool use_bf16_wgrad(const ConvGeometry&) { return false; }

std::pair<at::Tensor, at::Tensor> bf16_weight_gradient(const ConvGeometry&, const at::Tensor&,
                                                       const std::vector<Bf16WgradPart>&, const at::Tensor&,
                                                       std::array<bool, 3>) {
  TORCH_INTERNAL_ASSERT(false, "bf16_weight_gradient: no AVX512-BF16 here");
}

#endif

}  // namespace conv
}  // namespace unet_ext
