// The transforms of the CPU Winograd F(4x4, 3x3) convolution (layouts in winograd_cpu.h), built
// once per ISA (winograd_<isa>.cpp includes this under its target flags, in namespace
// UNET_CPU_ISA, with UNET_CPU_LANES floats per vector). Each 2-D transform is two passes of
// winograd::transform on GCC vectors of UNET_CPU_LANES tiles (or filter channels): along the rows,
// then down the columns, through small contiguous buffers (a tile row's columns are
// de-interleaved first, and the output's re-interleaved last).
// No torch headers here: everything inlined below is compiled for the ISA of its file only.

namespace unet_ext {
namespace winograd {
namespace UNET_CPU_ISA {

using conv::ChannelParts;
using conv::ConvGeometry;

constexpr int kLanes = UNET_CPU_LANES;

template <typename V, typename S>
inline V load(const S* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename S>
inline void store(S* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// out[k * out_k + x] = sum_j M[k][j] in[j * in_j + x] for x < n: vectors of kLanes x; a tail
// shorter than a vector as one more vector ending at n (lanes are independent and in and out do
// not overlap, so the x it computes twice get the same values; one scalar tile at a time, the
// 15 tiles left of a 79-tile row were a fifth of a 32-channel input transform), scalar only
// where n is shorter than a vector.
template <const auto& M, int R, int C, typename S>
inline void apply_rows(const S* __restrict in, int64_t in_j, S* __restrict out, int64_t out_k, int64_t n) {
  constexpr int lanes = kLanes * sizeof(float) / sizeof(S);
  typedef S Vec __attribute__((vector_size(lanes * sizeof(S))));
  const auto vector_at = [&](int64_t x) {
    Vec v[C], r[R];
    for (int j = 0; j < C; ++j) v[j] = load<Vec>(in + j * in_j + x);
    transform<M, R, C, S>(v, r);
    for (int k = 0; k < R; ++k) store(out + k * out_k + x, r[k]);
  };
  int64_t x = 0;
  for (; x + lanes <= n; x += lanes) vector_at(x);
  if (x < n && n >= lanes) {
    vector_at(n - lanes);
    return;
  }
  apply<M, R, C, 1, 1>(in + x, in_j, out + x, out_k, n - x);
}

// out[k * out_k + x] = sum_j M[k][j] in[j][x] for x < n, the C rows of `in` anywhere (apply_rows
// with a row pointer per j).
template <const auto& M, int R, int C>
inline void apply_rows_at(const float* const* in, float* __restrict out, int64_t out_k, int64_t n) {
  typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
  const auto vector_at = [&](int64_t x) {
    Vec v[C], r[R];
    for (int j = 0; j < C; ++j) v[j] = load<Vec>(in[j] + x);
    transform<M, R, C, float>(v, r);
    for (int k = 0; k < R; ++k) store(out + k * out_k + x, r[k]);
  };
  int64_t x = 0;
  for (; x + kLanes <= n; x += kLanes) vector_at(x);
  if (x < n && n >= kLanes) {  // as in apply_rows: in (the row's phases) does not overlap out
    vector_at(n - kLanes);
    return;
  }
  for (; x < n; ++x) {
    float v[C], r[R];
    for (int j = 0; j < C; ++j) v[j] = in[j][x];
    transform<M, R, C, float>(v, r);
    for (int k = 0; k < R; ++k) out[k * out_k + x] = r[k];
  }
}

// A tile row's columns, 4 apart: s[j][x] = row[4 x + j] for j < 4, x < n (the transforms run on
// vectors of tiles). With 16 lanes (GCC), 16 tiles at a time by two rounds of two-source
// shuffles (vpermt2ps) instead of 64 scalar moves; the re-interleave of the output likewise.
#if UNET_CPU_LANES == 16 && defined(__GNUC__) && !defined(__clang__)
#define UNET_WINOGRAD_SHUFFLE 1
typedef float ShuffleVec __attribute__((vector_size(64)));
typedef int32_t ShuffleIdx __attribute__((vector_size(64)));
// Lanes 0-7 from phase j, 8-15 from phase j + 1, of 8 tiles (32 floats): kPhase01 (j = 0), kPhase23 (j = 2).
inline constexpr ShuffleIdx kPhase01 = {0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29};
inline constexpr ShuffleIdx kPhase23 = {2, 6, 10, 14, 18, 22, 26, 30, 3, 7, 11, 15, 19, 23, 27, 31};
// The low (kLow) or high (kHigh) halves of two vectors, one after the other.
inline constexpr ShuffleIdx kLow = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
inline constexpr ShuffleIdx kHigh = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
// Output lane e = 4 x + p of [p0 x0-7 | p1 x0-7] and [p2 x0-7 | p3 x0-7]: tiles 0-3 (kOut0) or 4-7 (kOut1).
inline constexpr ShuffleIdx kOut0 = {0, 8, 16, 24, 1, 9, 17, 25, 2, 10, 18, 26, 3, 11, 19, 27};
inline constexpr ShuffleIdx kOut1 = {4, 12, 20, 28, 5, 13, 21, 29, 6, 14, 22, 30, 7, 15, 23, 31};
inline constexpr ShuffleIdx kLane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
// A 16x16 transpose in 4 rounds of 16 two-source shuffles (instead of 256 scalar moves): round k
// swaps bit k of the row index with bit k of the column index, making rows i (bit k clear) and
// i + 2^k from the same two rows: kSwapLow[k] takes column j of row i where j's bit k is clear,
// else column j - 2^k of row i + 2^k; kSwapHigh[k] column j + 2^k of row i, else column j of row i + 2^k.
inline constexpr ShuffleIdx kSwapLow[4] = {{0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30},
                                           {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
                                           {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27},
                                           {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23}};
inline constexpr ShuffleIdx kSwapHigh[4] = {{1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31},
                                            {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31},
                                            {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31},
                                            {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31}};
inline void transpose16(ShuffleVec (&r)[16]) {
  for (int k = 0; k < 4; ++k) {
    for (int i = 0; i < 16; ++i) {
      if (i & (1 << k)) continue;
      const ShuffleVec a = r[i], b = r[i | (1 << k)];
      r[i] = __builtin_shuffle(a, b, kSwapLow[k]);
      r[i | (1 << k)] = __builtin_shuffle(a, b, kSwapHigh[k]);
    }
  }
}
#endif

// Whether the transforms take a block's tile rows in groups (up to kRowGroupTiles tiles): rows
// shorter than a vector (else apply_rows' scalar path), and rows of one vector and a remainder
// (the remainder is a whole second vector, overlapping the first: 19 tiles cost 32). Rows of 17-31
// tiles grouped against one at a time (forward, dgrad and wgrad together, interleaved medians of
// 10, load 1.7): 2 x 64 -> 128 at 76x76 (19 tiles a row) 10.5-10.8 -> 9.5-10.3 ms, 2 x 128 -> 64 at
// 78 9.6-10.2 -> 9.1-10.0, 2 x 128 -> 128 at 74 16.45 -> 16.2, 2 x 64 -> 64 at 70 4.7 -> 4.5; the
// concat dgrad 2 x 128 -> 64 at 72 5.24 -> 5.10; inference at 572x572 (base 64) 899 -> 892.
inline bool group_rows(int64_t cols) { return cols < kLanes || (cols % kLanes != 0 && cols < 2 * kLanes); }
// Block rows per group: 1 where a row is not grouped, else up to kRowGroupTiles tiles (the scratch bound).
inline int64_t row_group(int64_t cols) { return !group_rows(cols) ? 1 : std::max<int64_t>(1, kRowGroupTiles / cols); }

inline void deinterleave4(const float* __restrict row, float* __restrict s0, float* __restrict s1,
                          float* __restrict s2, float* __restrict s3, int64_t n) {
  int64_t x = 0;
#ifdef UNET_WINOGRAD_SHUFFLE
  for (; x + 16 <= n; x += 16) {
    const float* r = row + kOut * x;
    const ShuffleVec a0 = load<ShuffleVec>(r), a1 = load<ShuffleVec>(r + 16), a2 = load<ShuffleVec>(r + 32),
                     a3 = load<ShuffleVec>(r + 48);
    const ShuffleVec u0 = __builtin_shuffle(a0, a1, kPhase01), u1 = __builtin_shuffle(a0, a1, kPhase23);
    const ShuffleVec w0 = __builtin_shuffle(a2, a3, kPhase01), w1 = __builtin_shuffle(a2, a3, kPhase23);
    store(s0 + x, __builtin_shuffle(u0, w0, kLow));
    store(s1 + x, __builtin_shuffle(u0, w0, kHigh));
    store(s2 + x, __builtin_shuffle(u1, w1, kLow));
    store(s3 + x, __builtin_shuffle(u1, w1, kHigh));
  }
#endif
  for (; x < n; ++x) {
    s0[x] = row[kOut * x];
    s1[x] = row[kOut * x + 1];
    s2[x] = row[kOut * x + 2];
    s3[x] = row[kOut * x + 3];
  }
}

void input_transform(const ConvGeometry& g, const ChannelParts<const float>& src,
                     const ChannelParts<const float>* mask, const TileBlock& b, int64_t c0, int64_t c1, float* v,
                     int64_t point_stride, float* scratch) {
  const int64_t cols = b.cols, width = kOut * cols + kKernel - 1, t_count = b.tiles();
  const int64_t col0 = kOut * b.tx0 - g.pad_w;  // input column of the row buffer's first element
  const int64_t lo = col0 < 0 ? std::min<int64_t>(-col0, width) : 0;
  const int64_t hi = std::max<int64_t>(lo, std::min<int64_t>(width, g.in_w - col0));
  // row: [4 (cols + 1)], one input row of the block row, zero-padded; phases: [4 j][cols + 1],
  // phases[j][x] = row[4 x + j] (so row[4 x + 4 + j] = phases[j][x + 1] for j = 4, 5); h: [6 y][6 k][cols],
  // B^T along each input row. Within transform_scratch(cols): 44 cols + 8 <= 60 cols + 12.
  const int64_t padded = kOut * (cols + 1);
  float* row = scratch;
  float* phases = row + padded;
  float* h = phases + padded;
  const float* split[kIn] = {phases, phases + (cols + 1), phases + 2 * (cols + 1), phases + 3 * (cols + 1),
                             phases + 1, phases + (cols + 1) + 1};
  const auto load_row = [&](int64_t c, int64_t ih) {  // row and phases from input row ih (inside the input)
    const float* s = src.at(b.n, c, ih) + col0;
    std::fill(row, row + lo, 0.0f);
    if (mask) {
      const float* m = mask->at(b.n, c, ih) + col0;
      for (int64_t x = lo; x < hi; ++x) row[x] = m[x] <= 0.0f ? 0.0f : s[x];  // NaN outputs pass, as in ReLU's backward
    } else {
      std::copy(s + lo, s + hi, row + lo);
    }
    std::fill(row + hi, row + padded, 0.0f);
    deinterleave4(row, phases, phases + (cols + 1), phases + 2 * (cols + 1), phases + 3 * (cols + 1), cols + 1);
  };
  if (group_rows(cols)) {
    // Rows shorter than a vector (the deep layers: 6-10 tiles a row; and group_rows' others): a
    // group of block rows at a time, both passes of B^T on vectors across the group's tiles (one row at a time they ran
    // apply_rows' scalar path). The six phases of each of the six input rows of every tile
    // (q[j][y][t]; phases 4 and 5 are 0 and 1 one tile on), then B^T along the rows into
    // h[k][y][t], then down the columns. With the output transform's groups, against both one
    // row at a time (dgrad with its filter transform, medians of 8, separate processes, load 1.6):
    // 2 x 256 -> 256 at 34x34 (9 tiles a row) 11.7 -> 9.1-9.3 ms, 2 x 128 -> 256 at 36 6.6 -> 5.0-5.9,
    // 2 x 128 -> 128 at 38 4.2-4.5 -> 2.9-3.2 (stock 3.8-4.1).
    const int64_t group = row_group(cols);
    float* q = phases + padded;
    for (int64_t c = c0; c < c1; ++c) {
      for (int64_t r0 = 0; r0 < b.rows; r0 += group) {
        const int64_t n = std::min(group, b.rows - r0) * cols;  // the group's tiles
        float* hk = q + kPoints * n;
        for (int64_t r = r0; r < r0 + n / cols; ++r) {
          for (int y = 0; y < kIn; ++y) {
            float* qy = q + y * n + (r - r0) * cols;  // phase j at qy[j * kIn * n]
            const int64_t ih = kOut * (b.ty0 + r) + y - g.pad_h;
            if (ih < 0 || ih >= g.in_h) {  // a padding row: its transform is zero
              for (int j = 0; j < kIn; ++j) std::fill(qy + j * kIn * n, qy + j * kIn * n + cols, 0.0f);
              continue;
            }
            load_row(c, ih);
            for (int j = 0; j < kIn; ++j) std::copy(split[j], split[j] + cols, qy + j * kIn * n);
          }
        }
        const float* split_q[kIn] = {q, q + kIn * n, q + 2 * kIn * n, q + 3 * kIn * n, q + 4 * kIn * n, q + 5 * kIn * n};
        apply_rows_at<kBT, kIn, kIn>(split_q, hk, kIn * n, kIn * n);
        // V[(i, k)][c][r * cols + x] = sum_y B^T[i][y] h[k][y][x]
        float* out = v + (c - c0) * t_count + r0 * cols;
        for (int k = 0; k < kIn; ++k) {
          apply_rows<kBT, kIn, kIn>(hk + k * kIn * n, n, out + k * point_stride, kIn * point_stride, n);
        }
      }
    }
    return;
  }
  for (int64_t c = c0; c < c1; ++c) {
    for (int64_t r = 0; r < b.rows; ++r) {
      for (int y = 0; y < kIn; ++y) {
        float* hy = h + y * kIn * cols;
        const int64_t ih = kOut * (b.ty0 + r) + y - g.pad_h;
        if (ih < 0 || ih >= g.in_h) {  // a padding row: its transform is zero
          std::fill(hy, hy + kIn * cols, 0.0f);
          continue;
        }
        load_row(c, ih);
        apply_rows_at<kBT, kIn, kIn>(split, hy, cols, cols);
      }
      // V[(i, k)][c][r * cols + x] = sum_y B^T[i][y] h[y][k][x]
      float* out = v + (c - c0) * t_count + r * cols;
      for (int k = 0; k < kIn; ++k) {
        apply_rows<kBT, kIn, kIn>(h + k * cols, kIn * cols, out + k * point_stride, kIn * point_stride, cols);
      }
    }
  }
}

bool output_transform(const ConvGeometry& g, const float* m, int64_t co0, int64_t co_count, const float* bias,
                      bool relu, const ChannelParts<float>& dst, const TileBlock& b, float* scratch) {
  bool nonfinite = false;  // v - v is NaN for an infinity or NaN, 0 otherwise
  const int64_t cols = b.cols, t_count = b.tiles(), point_stride = co_count * t_count;
  const int64_t ow0 = kOut * b.tx0, count = std::min<int64_t>(kOut * cols, g.out_w - ow0);
  // Rows group_rows takes (shorter than a vector: the deep layers' 6-10 tiles a row; and one vector
  // and a remainder) go through both passes of A^T a group of rows at a time (a channel's tiles are contiguous in M, row after row): one row
  // at a time they ran apply_rows' scalar path. With the tail's vector finish below, against
  // both one row at a time (interleaved medians of 10, separate processes, load 1.6): the concat
  // dgrad 2 x 256 -> 128 at 40x40 (10 tiles a row; the output transform had been 29% of it, as
  // much as the GEMMs) 8.6-8.8 -> 6.0-7.4 ms, 2 x 128 -> 64 at 72 5.2-5.3 -> 4.8.
  const int64_t group = row_group(cols);
  for (int64_t k = 0; k < co_count; ++k) {
    const int64_t co = co0 + k;
    const float shift = bias ? bias[co] : 0.0f;
    for (int64_t r0 = 0; r0 < b.rows; r0 += group) {
      const int64_t n = std::min(group, b.rows - r0) * cols;  // the group's tiles
      float* s = scratch;                // [4 a][6 k][n]: A^T down the columns
      float* y = scratch + kOut * kIn * n;  // [4 a][4 b][n]: the group's output rows, by column phase
      const float* in = m + k * t_count + r0 * cols;
      for (int kk = 0; kk < kIn; ++kk) {
        apply_rows<kAT, kOut, kIn>(in + kk * point_stride, kIn * point_stride, s + kk * n, kIn * n, n);
      }
      for (int a = 0; a < kOut; ++a) apply_rows<kAT, kOut, kIn>(s + a * kIn * n, n, y + a * kOut * n, n, n);
      for (int64_t r = r0; r < r0 + n / cols; ++r) {
        for (int a = 0; a < kOut; ++a) {
          const int64_t oh = kOut * (b.ty0 + r) + a;
          if (oh >= g.out_h) break;
          const float* yr = y + a * kOut * n + (r - r0) * cols;  // phase p of tile x at yr[p * n + x]
          // Re-interleaved: d[4 x + p] = y[p][x] (+ bias, ReLU); v < 0 ? 0 : v keeps NaN, as torch.relu does.
          float* d = dst.at(b.n, co, oh) + ow0;
          const auto finish = [&](float value) {
            nonfinite |= !(value - value == 0.0f);
            return relu && value < 0.0f ? 0.0f : value;
          };
          const int64_t whole = count / kOut;
          int64_t x0 = 0;
#ifdef UNET_WINOGRAD_SHUFFLE
          const ShuffleVec zero = {}, bias_v = zero + shift;
          ShuffleVec check = zero;  // sums v - v: NaN if any v is not finite
          // Tiles x .. x + 15 of the row re-interleaved, o[q][l] = d[kOut * x + 16 * q + l]: two rounds of shuffles.
          const auto interleave = [&](int64_t x, ShuffleVec (&o)[4]) {
            const ShuffleVec y0 = load<ShuffleVec>(yr + x), y1 = load<ShuffleVec>(yr + n + x),
                             y2 = load<ShuffleVec>(yr + 2 * n + x), y3 = load<ShuffleVec>(yr + 3 * n + x);
            const ShuffleVec u0 = __builtin_shuffle(y0, y1, kLow), w0 = __builtin_shuffle(y0, y1, kHigh);
            const ShuffleVec u1 = __builtin_shuffle(y2, y3, kLow), w1 = __builtin_shuffle(y2, y3, kHigh);
            o[0] = __builtin_shuffle(u0, u1, kOut0);
            o[1] = __builtin_shuffle(u0, u1, kOut1);
            o[2] = __builtin_shuffle(w0, w1, kOut0);
            o[3] = __builtin_shuffle(w0, w1, kOut1);
          };
          for (; x0 + 16 <= whole; x0 += 16) {
            ShuffleVec o[4];
            interleave(x0, o);
            for (int q = 0; q < 4; ++q) {
              const ShuffleVec value = o[q] + bias_v;
              check += value - value;
              store(d + kOut * x0 + 16 * q, relu ? (value < zero ? zero : value) : value);
            }
          }
          for (int l = 0; l < 16; ++l) nonfinite |= !(check[l] == 0.0f);
          if (x0 < cols) {
            // The last tiles (fewer than 16, and a partial tile) by the same shuffles into a buffer:
            // one at a time they were half of a 32-channel output transform (79 tiles a row: 15 left).
            // y lies inside transform_scratch, which extends past its last phase by more than a
            // vector; lanes past the row's tiles are read but dropped.
            // Finished (bias, ReLU, the finiteness check on the row's lanes only) as vectors, then
            // copied: element by element (a compare and branch each) the finish was 3/4 of the
            // output transform where every row is a tail (rows of 6-10 tiles).
            float tail[4 * 16];
            ShuffleVec o[4];
            interleave(x0, o);
            const int64_t left = count - kOut * x0;  // 1 to 63 floats
            ShuffleVec tail_check = zero;
            for (int q = 0; q < 4; ++q) {
              const ShuffleVec value = o[q] + bias_v;
              tail_check += kLane < static_cast<int32_t>(left - 16 * q) ? value - value : zero;
              store(tail + 16 * q, relu ? (value < zero ? zero : value) : value);
            }
            for (int l = 0; l < 16; ++l) nonfinite |= !(tail_check[l] == 0.0f);
            std::memcpy(d + kOut * x0, tail, left * sizeof(float));
            continue;
          }
#endif
          for (int64_t x = x0; x < whole; ++x)
            for (int p = 0; p < kOut; ++p) d[kOut * x + p] = finish(yr[p * n + x] + shift);
          for (int64_t i = whole * kOut; i < count; ++i) d[i] = finish(yr[(i % kOut) * n + i / kOut] + shift);
        }
      }
    }
  }
  return !nonfinite;
}

// The few-tiles path's output transform (output_transform_few in winograd_cpu.h): reads the GEMMs'
// M^T[p][t][co] where it lies, vectorised over kLanes output channels (the GEMM's vector dimension),
// one tile at a time: A^T down the columns, then along the rows, as output_transform (the same
// operations in the same order: the same results). The 16 results of a tile (4x4 outputs x kLanes
// channels) go to each channel's 4 rows by a 16x16 transpose (AVX-512 with GCC) or a buffer.
// Before it, M^T's part was transposed into output_transform's layout first: about 20% of
// 2 x 512 -> 256 at 24x24's forward and dgrad (winograd_few.cpp, convolve_few: the figures).
bool output_transform_few(const ConvGeometry& g, const float* mt, int64_t ldm, int64_t point_stride, int64_t co0,
                          int64_t co_count, const float* bias, bool relu, const ChannelParts<float>& dst,
                          const TileBlock& b) {
  typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
  const Vec zero = {};
  Vec check = zero;  // sums v - v: NaN if any v is not finite
  for (int64_t r = 0; r < b.rows; ++r) {
    const int64_t oh0 = kOut * (b.ty0 + r), out_rows = std::min<int64_t>(kOut, g.out_h - oh0);
    for (int64_t x = 0; x < b.cols; ++x) {
      const int64_t ow0 = kOut * (b.tx0 + x), out_cols = std::min<int64_t>(kOut, g.out_w - ow0);
      const float* in = mt + (r * b.cols + x) * ldm;
      for (int64_t c = 0; c < co_count; c += kLanes) {
        Vec s[kOut][kIn];  // s[a][k] = sum_j A^T[a][j] M[j][k]
        for (int k = 0; k < kIn; ++k) {
          Vec v[kIn], o[kOut];
          for (int j = 0; j < kIn; ++j) v[j] = load<Vec>(in + (j * kIn + k) * point_stride + c);
          transform<kAT, kOut, kIn, float>(v, o);
          for (int a = 0; a < kOut; ++a) s[a][k] = o[a];
        }
        const Vec shift = bias ? load<Vec>(bias + co0 + c) : zero;
        Vec y[kOut * kOut];  // y[4 a + q]: output (a, q) of the tile, + bias, ReLU
        for (int a = 0; a < kOut; ++a) {
          transform<kAT, kOut, kIn, float>(s[a], y + kOut * a);
          for (int q = 0; q < kOut; ++q) {
            const Vec value = y[kOut * a + q] + shift;
            check += value - value;
            y[kOut * a + q] = relu ? (value < zero ? zero : value) : value;  // keeps NaN, as torch.relu does
          }
        }
#ifdef UNET_WINOGRAD_SHUFFLE
        transpose16(y);  // y[l]: channel co0 + c + l's 4x4 outputs, row-major
        const auto row_of = [&](int l, int a) { return reinterpret_cast<const float*>(&y[l]) + kOut * a; };
#else
        float rows_buffer[kLanes][kOut * kOut];
        for (int i = 0; i < kOut * kOut; ++i)
          for (int l = 0; l < kLanes; ++l) rows_buffer[l][i] = y[i][l];
        const auto row_of = [&](int l, int a) { return rows_buffer[l] + kOut * a; };
#endif
        for (int l = 0; l < kLanes; ++l) {
          const int64_t co = co0 + c + l, stride = dst.row_stride(co);
          float* d = dst.at(b.n, co, oh0) + ow0;
          if (out_cols == kOut) {
            for (int a = 0; a < out_rows; ++a) std::memcpy(d + a * stride, row_of(l, a), kOut * sizeof(float));
          } else {
            for (int a = 0; a < out_rows; ++a) std::memcpy(d + a * stride, row_of(l, a), out_cols * sizeof(float));
          }
        }
      }
    }
  }
  bool nonfinite = false;
  for (int l = 0; l < kLanes; ++l) nonfinite |= !(check[l] == 0.0f);
  return !nonfinite;
}

void filter_transform(const float* w, int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride,
                      int64_t tap_stride, bool flip, int64_t r0, int64_t r1, float* u, double* scratch) {
  // In float64, rounded once: G's thirds and fifteenths are not exact in float32. Both passes of
  // G g G^T run in registers on a vector of filters, each of the 36 results stored as it is made
  // (through float64 buffers of [36][cols] between the passes, 256 x 256 filters took 1.0 ms
  // forward, 2.1 with dgrad's transpose, of a 9-15 ms convolution in training).
  constexpr int kTaps = kKernel * kKernel;
  constexpr int lanes = kLanes / 2;  // float64 per vector
  typedef double Vec __attribute__((vector_size(lanes * sizeof(double))));
  typedef float Out __attribute__((vector_size(lanes * sizeof(float))));
  double* taps = scratch;  // [ky][kx][cols]
  for (int64_t r = r0; r < r1; ++r) {
    int64_t c0 = 0;
#ifdef UNET_WINOGRAD_SHUFFLE
    if (tap_stride == 1) {
      // A column's 9 taps are contiguous (every layout but dgrad's transposed copy): 16 columns at
      // a time by 16 masked loads and a 16x16 transpose instead of 144 scalar loads, each column's
      // taps to a row, the next rows' lines prefetched (the few-tiles forward reads columns C_in x 9
      // floats apart). perf on 2 x 512 -> 512 at 14x14 forced onto the few-tiles path: the filter
      // transform from 2.09 to 1.71 times its GEMMs' time (the scalar gather's loads had been 40%
      // of it); the spilled store addresses below, a few % more.
      typedef float Half __attribute__((vector_size(lanes * sizeof(float))));
      for (; c0 + 16 <= cols; c0 += 16) {
        ShuffleVec v[16];
        for (int l = 0; l < 16; ++l) {
          if (r + 8 < r1) __builtin_prefetch(w + (r + 8) * row_stride + (c0 + l) * col_stride);
          // a masked load: the 7 floats past the taps are not read (past the weight's end at its last column)
          v[l] = _mm512_maskz_loadu_ps((1 << kTaps) - 1, w + r * row_stride + (c0 + l) * col_stride);
        }
        transpose16(v);  // v[t]: tap t of columns c0 .. c0 + 15
        for (int t = 0; t < kTaps; ++t) {
          const ShuffleVec& from = v[flip ? kTaps - 1 - t : t];
          Half lo, hi;
          std::memcpy(&lo, &from, sizeof(Half));
          std::memcpy(&hi, reinterpret_cast<const float*>(&from) + lanes, sizeof(Half));
          store(taps + t * cols + c0, __builtin_convertvector(lo, Vec));
          store(taps + t * cols + c0 + lanes, __builtin_convertvector(hi, Vec));
        }
      }
    }
#endif
    for (int t = 0; t < kTaps; ++t) {
      const float* from = w + r * row_stride + (flip ? kTaps - 1 - t : t) * tap_stride;
      for (int64_t c = c0; c < cols; ++c) taps[t * cols + c] = from[c * col_stride];
    }
    float* to = u + r * cols;
    const int64_t point_stride = rows * cols;
    const auto vector_at = [&](int64_t x) {
      Vec half[kIn][kKernel];  // G down the columns: half[a][kx]
      for (int kx = 0; kx < kKernel; ++kx) {
        Vec v[kKernel], h[kIn];
        for (int ky = 0; ky < kKernel; ++ky) v[ky] = load<Vec>(taps + (ky * kKernel + kx) * cols + x);
        transform<kG, kIn, kKernel, double>(v, h);
        for (int a = 0; a < kIn; ++a) half[a][kx] = h[a];
      }
      // Point by point through one pointer: 36 addresses kept from the row's start were spilled
      // and reloaded per vector.
      float* out = to + x;
      for (int a = 0; a < kIn; ++a) {
        Vec f[kIn];
        transform<kG, kIn, kKernel, double>(half[a], f);
        for (int b = 0; b < kIn; ++b, out += point_stride) store(out, __builtin_convertvector(f[b], Out));
      }
    };
    int64_t x = 0;
    for (; x + lanes <= cols; x += lanes) vector_at(x);
    if (x < cols && cols >= lanes) {
      vector_at(cols - lanes);  // the tail as one more vector ending at cols (the same values again)
    } else {
      for (; x < cols; ++x) {
        double half[kIn][kKernel];
        for (int kx = 0; kx < kKernel; ++kx) {
          double v[kKernel], h[kIn];
          for (int ky = 0; ky < kKernel; ++ky) v[ky] = taps[(ky * kKernel + kx) * cols + x];
          transform<kG, kIn, kKernel, double>(v, h);
          for (int a = 0; a < kIn; ++a) half[a][kx] = h[a];
        }
        for (int a = 0; a < kIn; ++a) {
          double f[kIn];
          transform<kG, kIn, kKernel, double>(half[a], f);
          for (int b = 0; b < kIn; ++b) to[(a * kIn + b) * point_stride + x] = static_cast<float>(f[b]);
        }
      }
    }
  }
}

void grad_transform(const ConvGeometry& g, const ChannelParts<const float>& grad, const ChannelParts<const float>* mask,
                    const TileBlock& b, int64_t co0, int64_t co1, float* y, int64_t point_stride, double* sums,
                    float* scratch) {
  const int64_t cols = b.cols, width = kOut * cols, ld = g.out_channels;
  const int64_t ow0 = kOut * b.tx0, count = std::min<int64_t>(width, g.out_w - ow0);
  // Rows group_rows takes (shorter than a vector: the deep layers' 6-10 tiles a row; and one vector
  // and a remainder) a group of block rows at a time, as the input and output transforms: both passes of A on vectors across the group's
  // tiles, and Y's 16 x 16 transposes too (one row at a time all three ran scalar). With the
  // input transform's groups, against both one row at a time (wgrad, medians of 8, separate
  // processes, load 1.6): 2 x 256 -> 256 at 34x34 6.0-6.1 -> 5.1 ms, 2 x 128 -> 256 at 36 4.5-4.6 ->
  // 3.7-3.8, 2 x 128 -> 128 at 38 2.4-2.5 -> 2.0-2.1, 2 x 256 -> 512 at 16 4.2-4.3 -> 3.8-4.0.
  const int64_t group = row_group(cols);
  const int64_t most = group * cols;        // tiles in a group
  float* row = scratch;                     // [4 cols]: one gradient row of the block row, zero past the output
  float* split = row + width;               // [4 j][4 a][n]: split[j][a][t] = row a of tile t, column 4 x + j
  float* h = split + kOut * kOut * most;    // [6 k][4 a][n]: A along each gradient row
  float* outs = h + kIn * kOut * most;      // [kGradChannels c][36][n]: a channel group's tiles, transformed
  // Tile rows outside, groups of kGradChannels channels inside: Y is written a whole cache line
  // (16 channels) at a time, not one float per line per channel (those scattered stores were
  // half of a 32-channel wgrad).
  for (int64_t r0 = 0; r0 < b.rows; r0 += group) {
    const int64_t n = std::min(group, b.rows - r0) * cols;  // the group's tiles
    for (int64_t g0 = co0; g0 < co1; g0 += kGradChannels) {
      const int64_t channels = std::min<int64_t>(kGradChannels, co1 - g0);
      for (int64_t c = 0; c < channels; ++c) {
        const int64_t co = g0 + c;
        for (int64_t r = r0; r < r0 + n / cols; ++r) {
          double sum = 0;
          for (int a = 0; a < kOut; ++a) {
            float* sa = split + a * n + (r - r0) * cols;  // phase j at sa[j * kOut * n]
            const int64_t oh = kOut * (b.ty0 + r) + a;
            if (oh >= g.out_h) {  // past the output: a zero gradient
              for (int j = 0; j < kOut; ++j) std::fill(sa + j * kOut * n, sa + j * kOut * n + cols, 0.0f);
              continue;
            }
            const float* s = grad.at(b.n, co, oh) + ow0;
            if (mask) {
              const float* m = mask->at(b.n, co, oh) + ow0;
              for (int64_t x = 0; x < count; ++x) row[x] = m[x] <= 0.0f ? 0.0f : s[x];  // NaN outputs pass, as in ReLU's backward
            } else {
              std::copy(s, s + count, row);
            }
            std::fill(row + count, row + width, 0.0f);
            // In float64, 8 running sums (one chain of dependent adds was a quarter of a 32-channel wgrad);
            // whole groups of 8 first (a branch-free loop the compiler vectorises), then the tail.
            double part[8] = {};
            int64_t x0 = 0;
            for (; x0 + 8 <= width; x0 += 8)
              for (int l = 0; l < 8; ++l) part[l] += row[x0 + l];
            for (int l = 0; x0 + l < width; ++l) part[l] += row[x0 + l];
            sum += ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
            deinterleave4(row, sa, sa + kOut * n, sa + 2 * kOut * n, sa + 3 * kOut * n, cols);
          }
          if (sums) sums[co - co0] += sum;
        }
        // h[k][a][t] = sum_j A[k][j] split[j][a][t]; out[(i, k)][t] = sum_a A[i][a] h[k][a][t]
        apply_rows<kA, kIn, kOut>(split, kOut * n, h, kOut * n, kOut * n);
        float* out = outs + c * kPoints * n;
        for (int k = 0; k < kIn; ++k) {
          apply_rows<kA, kIn, kOut>(h + k * kOut * n, n, out + k * n, kIn * n, n);
        }
      }
      // Y[p][r0 cols + t][g0 + c] = outs[c][p][t]
      float* y0 = y + r0 * cols * ld + g0;
      for (int p = 0; p < kPoints; ++p) {
        int64_t t = 0;
#ifdef UNET_WINOGRAD_SHUFFLE
        static_assert(kGradChannels == 16, "one 16x16 transpose per 16 tiles");
        if (channels == kGradChannels) {  // 16 tiles at a time: the scalar moves below were half of grad_transform
          for (; t + 16 <= n; t += 16) {
            ShuffleVec v[16];
            for (int c = 0; c < 16; ++c) v[c] = load<ShuffleVec>(outs + (c * kPoints + p) * n + t);
            transpose16(v);
            for (int i = 0; i < 16; ++i) store(y0 + p * point_stride + (t + i) * ld, v[i]);
          }
        }
#endif
        for (; t < n; ++t) {
          float* to = y0 + p * point_stride + t * ld;
          const float* from = outs + p * n + t;
          if (channels == kGradChannels) {  // a constant trip count: unrolled
            for (int64_t c = 0; c < kGradChannels; ++c) to[c] = from[c * kPoints * n];
          } else {
            for (int64_t c = 0; c < channels; ++c) to[c] = from[c * kPoints * n];
          }
        }
      }
    }
  }
}

bool weight_transform(const float* m, int64_t point_stride, int64_t ci0, int64_t ci1, int64_t c_in, int64_t co0,
                      int64_t co1, float* dw, float* scratch) {
  bool nonfinite = false;  // v - v is NaN for an infinity or NaN, 0 otherwise
  constexpr int kTaps = kKernel * kKernel;
  const int64_t n = co1 - co0;
  float* half = scratch;                 // [3 k][6 q][n]: G^T down the columns
  float* full = half + kKernel * kIn * n;  // [3 k][3 l][n]
  for (int64_t ci = ci0; ci < ci1; ++ci) {
    const float* mc = m + (ci - ci0) * n;
    for (int q = 0; q < kIn; ++q) {
      apply_rows<kGT, kKernel, kIn>(mc + q * point_stride, kIn * point_stride, half + q * n, kIn * n, n);
    }
    for (int k = 0; k < kKernel; ++k) {
      apply_rows<kGT, kKernel, kIn>(half + k * kIn * n, n, full + k * kKernel * n, n, n);
    }
    for (int64_t co = co0; co < co1; ++co) {
      float* to = dw + (co * c_in + ci) * kTaps;
      for (int t = 0; t < kTaps; ++t) {
        const float value = full[t * n + co - co0];
        nonfinite |= !(value - value == 0.0f);
        to[t] = value;
      }
    }
  }
  return !nonfinite;
}

// The few-tiles GEMM's register block: kFewRows tiles x up to kFewVectors vectors of output
// channels, a chunk sum and a group sum each in registers (2 x 12 of AVX-512's 32; AVX2 and SSE
// have 16: one vector).
constexpr int kFewRows = 4, kFewVectors = kLanes == 16 ? 3 : 1;

// m[t * ldm + c] = sum_k v[k * ldv + t] u[k * ldu + c] for t < R, c < NV vectors: each chunk of
// kChunk products summed from zero, the chunks added into a group sum per kGroup, the groups into
// m (the order of the brgemm path, so the same rounding).
template <int R, int NV>
inline void few_block(const float* __restrict v, int64_t ldv, const float* __restrict u, int64_t ldu,
                      float* __restrict m, int64_t ldm, int64_t depth) {
  typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
  for (int64_t g0 = 0; g0 < depth; g0 += kGroup) {
    const int64_t g1 = std::min<int64_t>(g0 + kGroup, depth);
    Vec group[R][NV] = {};  // + the first chunk's sum: exact
    for (int64_t k0 = g0; k0 < g1; k0 += kChunk) {
      const int64_t k1 = std::min<int64_t>(k0 + kChunk, g1);
      Vec acc[R][NV] = {};
      for (int64_t k = k0; k < k1; ++k) {
        Vec b[NV];
        for (int j = 0; j < NV; ++j) b[j] = load<Vec>(u + k * ldu + j * kLanes);
        for (int i = 0; i < R; ++i) {
          const Vec a = Vec{} + v[k * ldv + i];
          for (int j = 0; j < NV; ++j) acc[i][j] += a * b[j];
        }
      }
      for (int i = 0; i < R; ++i)
        for (int j = 0; j < NV; ++j) group[i][j] += acc[i][j];
    }
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < NV; ++j) {
        float* to = m + i * ldm + j * kLanes;
        store(to, g0 == 0 ? group[i][j] : load<Vec>(to) + group[i][j]);
      }
  }
}

template <int R>
inline void few_rows(const float* v, int64_t ldv, const float* u, int64_t ldu, float* m, int64_t ldm, int64_t cols,
                     int64_t depth) {
  int64_t c = 0;
  for (; c + kFewVectors * kLanes <= cols; c += kFewVectors * kLanes) few_block<R, kFewVectors>(v, ldv, u + c, ldu, m + c, ldm, depth);
  if constexpr (kFewVectors == 3) {
    if (c + 2 * kLanes <= cols) {
      few_block<R, 2>(v, ldv, u + c, ldu, m + c, ldm, depth);
      c += 2 * kLanes;
    }
  }
  for (; c < cols; c += kLanes) few_block<R, 1>(v, ldv, u + c, ldu, m + c, ldm, depth);
}

void few_gemm(const float* v, int64_t ldv, const float* u, int64_t ldu, float* m, int64_t ldm, int64_t rows,
              int64_t cols, int64_t depth) {
  int64_t t = 0;
  for (; t + kFewRows <= rows; t += kFewRows) few_rows<kFewRows>(v + t, ldv, u, ldu, m + t * ldm, ldm, cols, depth);
  switch (rows - t) {
    case 3: few_rows<3>(v + t, ldv, u, ldu, m + t * ldm, ldm, cols, depth); break;
    case 2: few_rows<2>(v + t, ldv, u, ldu, m + t * ldm, ldm, cols, depth); break;
    case 1: few_rows<1>(v + t, ldv, u, ldu, m + t * ldm, ldm, cols, depth); break;
    default: break;
  }
}

void add(float* __restrict dst, const float* __restrict src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
}

}  // namespace UNET_CPU_ISA
}  // namespace winograd
}  // namespace unet_ext
