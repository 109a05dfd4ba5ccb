// The CPU Winograd F(4x4, 3x3) convolution (layouts in winograd_cpu.h): a task takes a block of
// tiles of one image (and a block of output channels), transforms its inputs into V, runs the 36
// GEMMs M_p = U_p V_p with oneDNN's brgemm (cpu/gemm.h) and transforms M into the output with the
// bias and the ReLU; the block is sized so that V and M stay near the L2 cache. Also: the filter
// transforms and their cache, the selection rules (use_few_tiles: the few-tiles path, in
// winograd_few.cpp), the weight gradient, the allow_winograd switch, and the one-tile op that the
// float64 unit test runs. Shared with winograd_few.cpp: winograd_driver.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <list>
#include <mutex>
#include <vector>

#if defined(__linux__)
#include <pthread.h>
#endif

#include "cpu_isa.h"
#include "gemm.h"
#include "huge_pages.h"
#include "partials.h"
#include "winograd_driver.h"

namespace unet_ext {
namespace winograd {

using conv::ChannelParts;
using conv::ConvGeometry;

const Kernels& kernels() {
  static const Kernels k = [] {
    switch (cpu::best_isa()) {
      case cpu::Isa::kAvx512:
        return Kernels{&avx512::input_transform, &avx512::output_transform, &avx512::output_transform_few, &avx512::filter_transform, &avx512::add,
                       &avx512::grad_transform, &avx512::weight_transform, &avx512::few_gemm};
      case cpu::Isa::kAvx2:
        return Kernels{&avx2::input_transform, &avx2::output_transform, &avx2::output_transform_few, &avx2::filter_transform, &avx2::add,
                       &avx2::grad_transform, &avx2::weight_transform, &avx2::few_gemm};
      default:
        return Kernels{&baseline::input_transform, &baseline::output_transform, &baseline::output_transform_few, &baseline::filter_transform, &baseline::add,
                       &baseline::grad_transform, &baseline::weight_transform, &baseline::few_gemm};
    }
  }();
  return k;
}

namespace {

std::atomic<bool>& allow_flag() {
  // UNET_EXT_WINOGRAD=0 starts with it off (benchmarks of the direct path in a fresh process).
  static std::atomic<bool> flag{[] {
    const char* value = std::getenv("UNET_EXT_WINOGRAD");
    return value == nullptr || std::strcmp(value, "0") != 0;
  }()};
  return flag;
}

// Set while the library loads (huge_pages.cpp: no static's first call under way at a fork).
[[maybe_unused]] const bool chosen_at_load = (kernels(), allow_flag(), true);

}  // namespace

bool filter_cache_enabled() { return !c10::GradMode::is_enabled(); }

bool allow_winograd() { return allow_flag().load(std::memory_order_relaxed); }
void set_allow_winograd(bool allow) { allow_flag().store(allow, std::memory_order_relaxed); }

// Measured on this project's 2-core AVX-512 CPU against the direct path (interleaved medians on
// a quiet machine, load 1.0-1.5; runs that share the cores with other jobs favour Winograd), with
// the transforms' phases split by shuffles (cpu/winograd_kernel.h): forward with cached filters
// 2 x 32 -> 32 at 314x314 1.19x, 2 x 64 -> 64 at 154 1.61x, 2 x 128 -> 128 at 74 1.67x,
// 2 x 64 -> 32 at 154 1.29x, 2 x 128 -> 64 at 78 1.60x, 1 x 64 -> 64 at 290 1.66x, 1 x 128 -> 128
// at 282 2.0x; dgrad 2 x 32 -> 32 at 314 1.23x, 64 -> 64 at 154 1.54x, 128 -> 128 at 74 1.70x.
// (Before the shuffles the transforms took 2/3 of a 64-channel forward and 64 -> 64 was 0.78-0.86x.)
// The transforms cost ~ C_in + C_out per tile, the saved multiplications ~ C_in x C_out: Winograd
// where 1 / C_in + 1 / C_out <= 1 / 16 (32 -> 32 and up; not the first layer, 1 -> 64).
// Where the filters are transformed on the call (training: the weights change every step, and
// every dgrad) that transform, and the GEMMs' short N, cost more than they save on small images:
// 2 x 512 -> 512 at 14x14 (forward 18 tiles, dgrad 32) 0.63x forward and 0.44x dgrad, 2 x 256 ->
// 512 at 16 (32 tiles) 0.57x / 0.51x, 2 x 512 -> 256 at 24 (72 tiles) 0.81x / 0.75x, 2 x 256 ->
// 256 at 22 (dgrad 72 tiles) 0.66x; at 2 x 36x36 (162 tiles) 1.15-1.21x: kMinTilesPerCall
// tiles. (The forward's filters are per call only on a weight version's first call:
// use_winograd_forward.) Padding up to k - 1 = 2 (dgrad's padding 2 - p >= 0): beyond it much
// of each output reads padding, stock float32 sums fewer terms, and Winograd's error was 8-11x
// stock's (padding 3). And tiles at least half inside the output (8 of 16 outputs on average): a
// tile costs 36 products per channel pair however much of it is output, the direct path 9 per
// output; 1x1 outputs (1/16 of a tile) were 0.29-0.42x the direct path forward, and their wgrad 9x
// stock's error (the transforms' rounding, where stock sums a few terms).
constexpr int64_t kChannelScale = 16, kMinTilesPerCall = 128;

namespace {
bool winograd_geometry(const ConvGeometry& g, at::ScalarType dtype, int64_t channel_scale, int64_t min_tiles) {
  const int64_t tiles = g.batch * ((g.out_h + kOut - 1) / kOut) * ((g.out_w + kOut - 1) / kOut);
  return dtype == at::kFloat && allow_winograd() && g.kernel_h == kKernel && g.kernel_w == kKernel &&
         g.pad_h >= 0 && g.pad_h < kKernel && g.pad_w >= 0 && g.pad_w < kKernel &&
         channel_scale * (g.in_channels + g.out_channels) <= g.in_channels * g.out_channels && tiles > 0 &&
         tiles >= min_tiles && 2 * g.batch * g.out_h * g.out_w >= kOut * kOut * tiles;
}
}  // namespace

bool use_winograd(const ConvGeometry& g, at::ScalarType dtype, bool filter_per_call) {
  // UNET_EXT_WINOGRAD_MIN_TILES replaces kMinTilesPerCall, read per call (a benchmark knob: the
  // deep layers' routing timed in one process). With filters transformed per call (training),
  // Winograd against the current routing, interleaved medians (load 1.1-1.5): forward / dgrad 2 x
  // 256 -> 512 at 16x16 8.4 / 12.2 ms against 6.6 / 6.6, 512 -> 512 at 14 17.3 / 19.1 against
  // 10.2 / 8.9, 512 -> 256 at 24 13.7 / 17.4 against 12.3 / 11.8, 256 -> 256 at 22 5.1 / 7.6 against
  // 5.1 / 5.1: the rule stands.
  const char* value = std::getenv("UNET_EXT_WINOGRAD_MIN_TILES");
  const int64_t min_tiles = !filter_per_call || use_few_tiles(g) ? 1 : value ? std::atoll(value) : kMinTilesPerCall;
  return winograd_geometry(g, dtype, kChannelScale, min_tiles);
}

// The few-tiles path (convolve_few) with filters transformed per call: kFewTilesMin to kFewTilesMax
// tiles per call, output channels a multiple of 16 (its GEMM's vectors) up to kFewMaxOut, and for
// weights past kFewWeights (256 x 512; e.g. 512 x 512) tiles at least 4/5 inside the output: 2 x 512 -> 512 at
// 14x14's dgrad (32 tiles for 2 x 14x14 outputs) took 7.8-7.9 ms against oneDNN's 7.4-7.5 (tiles
// partly outside the output cost their transforms and products in full). Against the routing
// before it (oneDNN), training conditions (a new weight version per call), interleaved medians of
// 25, two runs, load 1.7, forward / dgrad, since the output transform reads M^T in place
// (convolve_few): 2 x 512 -> 512 at 14x14 forward (18 tiles) 6.3-6.5 against 7.6-8.6 (stock
// 7.0-7.6), 256 -> 512 at 16 (32 tiles) 3.9-4.1 / 4.5-4.9 against 5.0-5.7 / 4.8-5.1, 256 -> 256 at
// 22 dgrad (72 tiles for 2 x 22x22 outputs) 4.0-4.6 against 4.8-5.3: from 16 tiles, whatever the
// depth (before it, 256 -> 512 at 16 and 512 -> 512 at 14 were slower than oneDNN on this path,
// and 256 -> 256 at 22's dgrad; it had taken 48 tiles and, below 512 input channels, tiles 10/11
// inside the output). Up to kFewTilesMax against the brgemm path (its filters also per call),
// medians of 11-21, load 1.6-1.8, forward / dgrad: 2 x 128 -> 256 at 36x36 (162 tiles) 4.2 / 4.3
// against 6.7 / 7.0, 128 -> 128 at 38 (162) 2.6 / 3.0 against 3.9 / 4.6, 256 -> 128 at 40 (200)
// 5.6 / 5.5 against 7.6 / 8.9, 256 -> 256 at 34 (128; dgrad 162) 6.3 / 7.5 against 9.1 / 12.0,
// 128 -> 128 at 58 (392) 6.6 / 7.5 against 8.2 / 9.1, 64 -> 64 at 62 (450) 3.3 / 2.9 against
// 3.9 / 3.7; but 128 -> 128 at 66 (512) 7.6 / 11.9 against 7.3 / 9.2, 64 -> 64 at 70 (578) 2.8-3.4
// / 3.0-5.4 against 2.6-2.7 / 2.8-2.9, 128 -> 128 at 74 (648) 9.7 / 12.9 against 9.3 / 9.4. In the
// training step (base 32, 2 x 316x316, torch.profiler) the five layers at 128-200 tiles took
// about 15 ms less, forward and backward (it had been 127: the brgemm path from 128 tiles). Past
// kFewWeights, up to kFewTilesMaxDeep only: a filter panel (36 x C_in x 32 floats) outgrows the
// L2, and the paper's layers at batch 1 (per-call filters, medians of 7) took 1 x 1024 -> 512 at
// 56x56 (196 tiles) forward 108.6 ms against 84.6, 512 -> 512 at 66 dgrad (289) 78.8 against 65.0
// (its forward 45.5 against 51.5; 256 -> 512 at 68, 289 tiles at 256 x 512, 26.7 / 37.2 against
// 41.9 / 38.6).
// Past kFewMaxOut the forward's filters are read from a
// transposed copy made per call (filter_source): 1 x 512 -> 1024 at 32x32 (a paper inference
// layer's first call) took 51.6 ms against the direct path's 44.5. UNET_EXT_WINOGRAD_FEW_TILES,
// read per call: 0 off, a number replaces both maxima, "all" takes every geometry the channels
// allow (benchmarks: old and new routing timed in one process; tests: partial tiles).
constexpr int64_t kFewTilesMin = 16, kFewTilesMax = 400, kFewTilesMaxDeep = 127, kFewWeights = 256 * 512,
                  kFewMaxOut = 512;

bool use_few_tiles(const ConvGeometry& g) {
  const char* value = std::getenv("UNET_EXT_WINOGRAD_FEW_TILES");
  const int64_t tiles = g.batch * ((g.out_h + kOut - 1) / kOut) * ((g.out_w + kOut - 1) / kOut);
  const int64_t outputs = g.batch * g.out_h * g.out_w;
  if (value && std::strcmp(value, "all") == 0) return g.out_channels % 16 == 0 && g.out_channels <= kFewMaxOut;
  const bool deep = g.in_channels * g.out_channels > kFewWeights;
  return g.out_channels % 16 == 0 && g.out_channels <= kFewMaxOut && tiles >= kFewTilesMin &&
         tiles <= (value ? std::atoll(value) : deep ? kFewTilesMaxDeep : kFewTilesMax) &&
         (!deep || 4 * kOut * kOut * tiles <= 5 * outputs);
}

// The weight gradient's rule has its own tile minimum: its transforms are cheaper (A's entries
// are powers of two; G^T runs once per channel pair, not per tile) and its filter-size output needs
// no filter transform. Its channel scale was 32 while the transformed gradient went through memory
// (weight_gradient's grouped path): 2 x 32 -> 32 at 314 0.89x the direct path, 2 x 32 -> 64 at 156
// 0.84x. With small weights fused (weight_gradient_fused: Y stays in the L2), wgrad alone against
// the direct path, interleaved medians (load 1.3-1.5): 2 x 32 -> 32 at 314 1.16x, 2 x 32 -> 64
// at 156 1.21x, 2 x 64 -> 32 at 136 1.10x, 2 x 32 -> 32 at 134 1.05x, 2 x 64 -> 64 at 154 1.42x
// (the grouped path 1.0x); so from 1 / C_in + 1 / C_out <= 1 / 16, as forward and dgrad. On small
// images it still pays: 2 x 512 -> 512 at 14 (18 tiles) 1.14x, 2 x 256 -> 512 at 16 (32 tiles)
// 1.86x, 2 x 512 -> 256 at 24 2.29x: from 16 tiles. UNET_EXT_WINOGRAD_WGRAD_SCALE replaces the 16,
// read per call (a benchmark knob: benchmarks/bench_winograd.py sets a scale no layer meets to
// time the direct wgrad in the same process).
constexpr int64_t kWgradChannelScale = 16, kWgradMinTiles = 16;

bool use_winograd_wgrad(const ConvGeometry& g, at::ScalarType dtype) {
  const char* value = std::getenv("UNET_EXT_WINOGRAD_WGRAD_SCALE");
  return winograd_geometry(g, dtype, value != nullptr ? std::atoll(value) : kWgradChannelScale, kWgradMinTiles);
}

namespace {

// U[36][rows][cols] from weight [C_out][C_in][3][3] (float32, contiguous): rows = C_out for the
// forward; for dgrad rows = C_in of the flipped filters. Dgrad reads a filter row's C_out taps
// across the weight in place while those C_out cache lines fit half the L1 (consecutive rows
// share them), else from a copy transposed to [C_in][3x3][C_out]. In place against the copy,
// dgrad with its transform (one process each, load 1.2-1.8): 2 x 256 -> 256 at 34x34 12.5 against
// 13.0 ms interleaved, 128 -> 256 6.8 against 7.0, 2 x 1024 -> 512 at 34 transform 37.8 against
// 40.2; but 512 -> 1024 (1024 lines a row) 32.5 against 23.2.
constexpr int64_t kInPlaceLines = 512;
}  // namespace

FilterSource filter_source(const at::Tensor& weight, bool dgrad, bool few_layout) {
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  const int64_t c_out = w.size(0), c_in = w.size(1), taps = kKernel * kKernel;
  const bool across = dgrad != few_layout;  // a row of U holds C_out filters (read across the weight)
  const int64_t rows = across ? c_in : c_out, cols = across ? c_out : c_in;
  const bool transposed = across && c_out > kInPlaceLines;
  at::Tensor source = w;
  if (transposed) {
    source = cpu::empty_huge({c_in, taps, c_out}, w.options());
    cpu::transpose(w.const_data_ptr<float>(), c_out, c_in * taps, source.mutable_data_ptr<float>());
  }
  const int64_t row_stride = transposed ? taps * c_out : across ? taps : c_in * taps;
  const int64_t col_stride = transposed ? 1 : across ? c_in * taps : taps, tap_stride = transposed ? c_out : 1;
  return FilterSource{source, rows, cols, row_stride, col_stride, tap_stride, dgrad};
}

namespace {

at::Tensor transform_filter(const at::Tensor& weight, bool dgrad) {
  const FilterSource f = filter_source(weight, dgrad, false);
  at::Tensor u = cpu::empty_huge({kPoints, f.rows, f.cols}, f.source.options());  // up to 151 MB: no page faults per call
  const float* w_data = f.source.const_data_ptr<float>();
  float* u_data = u.mutable_data_ptr<float>();
  const auto filter = kernels().filter;
  at::parallel_for(0, f.rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, f.cols)), [&](int64_t r0, int64_t r1) {
    std::vector<double> scratch(filter_scratch(f.cols));
    filter(w_data, f.rows, f.cols, f.row_stride, f.col_stride, f.tap_stride, f.flip, r0, r1, u_data, scratch.data());
  });
  return u;
}

// Transformed filters are kept while it is safe to: outside autograd (no_grad, inference_mode),
// keyed on the weight's TensorImpl (held weakly, so a freed weight's address cannot alias a new
// one), data pointer, shape and version counter, so an in-place update (optimizer step,
// load_state_dict, copy_) is seen. In training (grad mode) they are transformed per call: the
// weights change every step. Entries past kCacheBytes are dropped, least recently used first.
constexpr int64_t kCacheBytes = int64_t{1} << 30;
struct CacheEntry {
  // The weak reference keeps the TensorImpl's memory (not the tensor) alive, so no other tensor
  // can have `key`'s address while the entry exists: a live weight whose TensorImpl is at `key`
  // is that weight. Never lock() it under cache_mutex: with torch's PyObject preservation (2.14)
  // lock() may take the GIL, and the fork handler takes cache_mutex with the GIL held (os.fork):
  // a lock-order inversion that hung CI's fork test in the parent.
  c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> impl;
  const c10::TensorImpl* key;
  const void* data;
  std::vector<int64_t> sizes;
  int64_t version;
  bool dgrad;
  at::Tensor u;
};

std::mutex cache_mutex;
std::list<CacheEntry> cache_entries;  // most recently used first

#if defined(__linux__)
// Held across fork() (pthread_atfork, registered while the library loads, before anything can
// fork): a child forked while another thread holds the lock finds it unlocked, not held forever by
// a thread it does not have (DataLoader workers running no-grad Winograd convs). Nothing is freed
// under the lock (dropped entries are destroyed after it), so it nests inside no other lock and
// the order of the handlers does not matter.
[[maybe_unused]] const bool fork_handlers_registered =
    (pthread_atfork([] { cache_mutex.lock(); }, [] { cache_mutex.unlock(); }, [] { cache_mutex.unlock(); }), true);
#endif

bool cacheable(const at::Tensor& weight) {
  return filter_cache_enabled() && !weight.is_inference() && weight.scalar_type() == at::kFloat;
}

bool entry_matches(const CacheEntry& e, const at::Tensor& weight, bool dgrad) {
  return e.dgrad == dgrad && e.data == weight.const_data_ptr() && e.version == weight._version() &&
         weight.sizes().equals(e.sizes) && e.key == weight.unsafeGetTensorImpl();
}

// Puts (weight's current version, u) first, under the lock; drops this weight's older versions
// and any entry whose weight is gone into `dropped` (freed by the caller after the lock: freeing
// filters takes the output cache's lock, which must not nest in this one), then trims to the budget.
// An undefined u records that the version was seen (use_winograd_forward), costing no memory.
void insert_entry(const at::Tensor& weight, bool dgrad, const at::Tensor& u, std::list<CacheEntry>& dropped) {
  auto& entries = cache_entries;
  for (auto it = entries.begin(); it != entries.end();) {
    const auto next = std::next(it);
    if (it->impl.expired() || (it->dgrad == dgrad && it->key == weight.unsafeGetTensorImpl())) {
      dropped.splice(dropped.end(), entries, it);
    }
    it = next;
  }
  entries.push_front(CacheEntry{c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(weight.getIntrusivePtr()),
                                weight.unsafeGetTensorImpl(), weight.const_data_ptr(), weight.sizes().vec(), weight._version(), dgrad, u});
  int64_t bytes = 0;
  for (auto it = entries.begin(); it != entries.end();) {
    const auto next = std::next(it);
    bytes += it->u.defined() ? it->u.nbytes() : 0;
    if (bytes > kCacheBytes && it != entries.begin()) dropped.splice(dropped.end(), entries, it);
    it = next;
  }
}

// Whether this version of the weight was seen by the forward before (its filters cached, or a
// record of the earlier call); records it if not. False where nothing is cached (grad mode).
bool seen_before(const at::Tensor& weight) {
  if (!cacheable(weight)) return false;
  std::list<CacheEntry> dropped;  // destroyed after the lock is released (declared first)
  std::lock_guard<std::mutex> lock(cache_mutex);
  for (auto it = cache_entries.begin(); it != cache_entries.end(); ++it) {
    if (entry_matches(*it, weight, false)) {
      cache_entries.splice(cache_entries.begin(), cache_entries, it);
      return true;
    }
  }
  insert_entry(weight, false, at::Tensor(), dropped);
  return false;
}

at::Tensor cached_filter(const at::Tensor& weight, bool dgrad) {
  if (!cacheable(weight)) return transform_filter(weight, dgrad);
  {
    std::lock_guard<std::mutex> lock(cache_mutex);
    for (auto it = cache_entries.begin(); it != cache_entries.end(); ++it) {
      if (entry_matches(*it, weight, dgrad) && it->u.defined()) {
        cache_entries.splice(cache_entries.begin(), cache_entries, it);
        return it->u;
      }
    }
  }
  at::Tensor u = transform_filter(weight, dgrad);
  std::list<CacheEntry> dropped;  // destroyed after the lock is released (declared first)
  std::lock_guard<std::mutex> lock(cache_mutex);
  insert_entry(weight, dgrad, u, dropped);
  return u;
}

// Tiles per task block: V [36][C_in][T] and M [36][co_block][T] near the 2 MiB L2, but at least
// kMinTiles (the GEMMs' N: below it the brgemm runs short vectors, and the deep layers'
// transformed weights, up to 151 MB, are streamed once per block). Forward, quiet machine, against
// 1 MiB (blocks of 64 tiles from 64 channels): 2 MiB took 2 x 128 -> 128 at 74x74 from 8.4 to 8.0
// ms (T = 72 -> 144), 1 x 256 -> 256 at 138 from 53.5 to 51.7, 64 channels the same; 4 MiB was
// 7.3 / 52.0 but 4% slower on 64 channels, 8 MiB 5-20% slower everywhere.
constexpr int64_t kBlockBytes = int64_t{2} << 20, kMinTiles = 64, kMaxTiles = 512;
constexpr int64_t kMaxChannelBlock = 256;
// The weight gradient's tile blocks (the GEMMs' K), its gradient transform's channel groups and its
// input-channel blocks (the GEMMs' M; a task's M is 36 x block x C_out floats).
constexpr int64_t kWgradTiles = 256, kWgradChannelGroup = 64, kWgradMaxChannelBlock = 128;
constexpr int64_t kWgradGroupBytes = int64_t{64} << 20;  // the transformed gradient held at once

// The GEMMs sum C_in products per point in chunks of kChunk, each from zero, and add the chunks'
// sums: float32 rounding then grows with kChunk + C_in / kChunk terms instead of C_in (the
// brgemm accumulates in order). The output transform amplifies that rounding (A^T's 8 and its
// cancellations): on 512 channels summing in one run was 20x stock float32's error, in chunks of
// 32 6x; chunks of 16 took 32 -> 40 channels' dgrad from 7.5-11x to 5.5-8.4x at no measurable cost.
// The chunk sums are added per group of kGroup channels first, then the groups: the deepest
// layers' 64 chunk sums in one run were up to 8.2x stock's error; grouped, the paper's layers
// are at 2.4-5.9x (forward and dgrad, batch 2 at 20x20, README "Winograd"). kChunk and kGroup
// are in winograd_cpu.h: the few-tiles GEMM (few_gemm) sums in the same order.

}  // namespace

// The forward's filters count as per call unless this weight version was seen before: in training
// the op runs under the autograd Function's no_grad too (so its filters are cached), but every
// step brings a new version. In inference a small image (the deep layers' 49-64 tiles at batch 1)
// takes the direct path on a version's first call and Winograd from the second.
bool use_winograd_forward(const ConvGeometry& g, at::ScalarType dtype, const at::Tensor& weight, bool* per_call) {
  if (!use_winograd(g, dtype, false)) return false;
  const bool first = !seen_before(weight);
  *per_call = first;
  return use_winograd(g, dtype, first);
}

// The few-tiles path transforms its filters itself (convolve_few, per panel of output channels),
// on per-call filters only (forward: a weight version's first call; cached filters take the brgemm path).
Filters forward_filter(const at::Tensor& weight, bool few, bool per_call) {
  if (few && per_call) return Filters{at::Tensor(), weight, true, false};
  return Filters{cached_filter(weight, false), weight, false, false};
}
Filters dgrad_filter(const at::Tensor& weight, bool few) {
  if (few) return Filters{at::Tensor(), weight, true, true};
  return Filters{cached_filter(weight, true), weight, false, true};
}

bool convolve(const ConvGeometry& g, const ChannelParts<const float>& src, const ChannelParts<const float>* mask,
              const Filters& filters, const float* bias, bool relu, const ChannelParts<float>& dst) {
  if (filters.few) return convolve_few(g, src, mask, filters, bias, relu, dst);
  const at::Tensor& u = filters.u;
  std::atomic<bool> finite{true};
  const int64_t threads = at::get_num_threads();
  int64_t co_block = std::min(g.out_channels, kMaxChannelBlock);
  const BlockPlan plan(g, std::clamp<int64_t>(kBlockBytes / (kPoints * 4 * (g.in_channels + co_block)), kMinTiles, kMaxTiles));
  const int64_t blocks = plan.blocks;
  // Few blocks (the deep layers: small images): split the output channels too.
  if (blocks < 2 * threads && g.out_channels >= 32) {
    const int64_t split = std::min<int64_t>((2 * threads + blocks - 1) / blocks, g.out_channels / 16);
    co_block = std::min(co_block, ((g.out_channels + split - 1) / split + 15) / 16 * 16);
  }
  const int64_t co_blocks = (g.out_channels + co_block - 1) / co_block;
  const int64_t block_tiles = plan.rows * plan.cols;
  const float* u_data = u.const_data_ptr<float>();
  const Kernels& k = kernels();
  at::parallel_for(0, blocks * co_blocks, 1, [&](int64_t t0, int64_t t1) {
    float* v = cpu::scratch<float>(0, kPoints * g.in_channels * block_tiles);
    float* m = cpu::scratch<float>(1, kPoints * co_block * block_tiles);
    float* work = cpu::scratch<float>(2, transform_scratch(plan.cols));
    float* partial = cpu::scratch<float>(3, 2 * co_block * block_tiles);
    float* group = partial + co_block * block_tiles;
    int64_t loaded = -1;  // the block whose V this thread holds
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t bi = task / co_blocks, co0 = (task % co_blocks) * co_block;
      const int64_t co_count = std::min(co_block, g.out_channels - co0);
      const TileBlock b = plan.block(bi);
      const int64_t t_count = b.tiles();
      if (bi != loaded) {
        k.input(g, src, mask, b, 0, g.in_channels, v, g.in_channels * t_count, work);
        loaded = bi;
      }
      for (int64_t p = 0; p < kPoints; ++p) {
        // M_p[co, t] = U_p[co, ci] V_p[ci, t], summed over ci in chunks, the chunks in groups
        float* mp = m + p * co_count * t_count;
        const int64_t size = co_count * t_count;
        for (int64_t g0 = 0; g0 < g.in_channels; g0 += kGroup) {
          float* sum = g0 == 0 ? mp : group;
          for (int64_t k0 = g0; k0 < std::min(g0 + kGroup, g.in_channels); k0 += kChunk) {
            const int64_t kb = std::min(kChunk, g.in_channels - k0);
            cpu::gemm(co_count, t_count, kb, u_data + (p * g.out_channels + co0) * g.in_channels + k0, g.in_channels,
                      v + (p * g.in_channels + k0) * t_count, t_count, k0 == g0 ? sum : partial, t_count, false);
            if (k0 > g0) k.add(sum, partial, size);
          }
          if (g0 > 0) k.add(mp, group, size);
        }
      }
      if (!k.output(g, m, co0, co_count, bias, relu, dst, b, work)) finite.store(false, std::memory_order_relaxed);
    }
    cpu::gemm_release();
  });
  return finite.load();
}

// The weight gradient, F(3x3, 4x4): per tile block, Y_p[T, C_out] = A dy A^T of the (masked) output
// gradient and V_p[C_in, T] = B^T d B of the input (the forward's input transform); the 36 GEMMs
// M_p[C_in, C_out] += V_p Y_p sum over the blocks; dw = G^T M G per channel pair at the end.
// Phase 1 transforms the gradient of a group of blocks (Y: 36/16 of its size) in parallel over
// (block, channel group); phase 2 runs tasks over input-channel blocks (and output-channel blocks
// where the threads are many), each owning its part of M (no partial sums to add, a fixed order:
// deterministic) and walking the group's blocks in turn; then the next group.
namespace {

// Small weights (kPoints x C_in x C_out floats within kFusedWeightBytes: up to 64 <-> 128): one task
// per part of the tile blocks (partials.h), each block's gradient transform (Y) and input transform
// (V) made in its thread's scratch and used by the GEMMs at once, into the part's own M; the parts'
// M added in part order at the end. The grouped path below writes Y to memory and reads it back
// once per input-channel block: on 2 x 32 -> 32 at 314x314 (57 MB of Y) that traffic made its
// wgrad no faster than the direct path's. Blocks of about kFusedBytes of V and Y (near the L2).
// Against the grouped path (interleaved medians, load 1.3-1.5): 2 x 32 -> 32 at 314 30.0 -> 21.1
// ms, 2 x 64 -> 64 at 154 20.0 -> 14.1, 2 x 64 -> 128 at 76 8.6 -> 6.9, 2 x 128 -> 64 at 78 6.8 ->
// 6.3; but 2 x 128 -> 128 at 74 10.3 -> 11.2 and 256 channels 30-50% slower (M per part past the
// L2): those stay grouped.
constexpr int64_t kFusedWeightBytes = int64_t{5} << 18, kFusedBytes = int64_t{1} << 20, kFusedMinTiles = 32;

bool weight_gradient_fused(const ConvGeometry& g, const ChannelParts<const float>& src,
                           const ChannelParts<const float>& grad, const ChannelParts<const float>* mask,
                           float* grad_weight, float* grad_bias) {
  const int64_t c_in = g.in_channels, c_out = g.out_channels;
  const BlockPlan plan(g, std::clamp<int64_t>(kFusedBytes / (kPoints * 4 * (c_in + c_out)), kFusedMinTiles, kWgradTiles));
  const int64_t parts = cpu::partial_count(plan.blocks), m_size = kPoints * c_in * c_out;
  const at::TensorOptions options = at::TensorOptions().dtype(at::kFloat);
  at::Tensor m_parts = at::empty({parts, m_size}, options);
  at::Tensor sums = at::zeros({plan.blocks, c_out}, options.dtype(at::kDouble));
  float* m_data = m_parts.mutable_data_ptr<float>();
  double* sums_data = sums.mutable_data_ptr<double>();
  const Kernels& k = kernels();
  const int64_t max_tiles = plan.rows * plan.cols;
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    float* y = cpu::scratch<float>(0, kPoints * max_tiles * c_out);
    float* v = cpu::scratch<float>(1, kPoints * c_in * max_tiles);
    float* work = cpu::scratch<float>(2, std::max(transform_scratch(plan.cols), grad_scratch(plan.cols)));
    for (int64_t part = p0; part < p1; ++part) {
      float* m = m_data + part * m_size;
      const int64_t b0 = cpu::part_begin(plan.blocks, parts, part), b1 = cpu::part_begin(plan.blocks, parts, part + 1);
      for (int64_t bi = b0; bi < b1; ++bi) {
        const TileBlock b = plan.block(bi);
        const int64_t t_count = b.tiles();
        k.grad(g, grad, mask, b, 0, c_out, y, t_count * c_out, sums_data + bi * c_out, work);
        k.input(g, src, nullptr, b, 0, c_in, v, c_in * t_count, work);
        for (int64_t p = 0; p < kPoints; ++p) {
          // M_p[ci, co] += V_p[ci, t] Y_p[t, co]
          cpu::gemm(c_in, c_out, t_count, v + p * c_in * t_count, t_count, y + p * t_count * c_out, c_out,
                    m + p * c_in * c_out, c_out, bi > b0);
        }
      }
      if (b0 == b1) std::fill(m, m + m_size, 0.0f);
    }
    cpu::gemm_release();
  });
  const at::Tensor m_sum = parts > 1 ? m_parts.sum(0) : m_parts[0];  // a fixed order for a given part count
  const float* m = m_sum.const_data_ptr<float>();
  std::atomic<bool> finite{true};
  at::parallel_for(0, c_in, std::max<int64_t>(1, 4096 / c_out), [&](int64_t ci0, int64_t ci1) {
    float* work = cpu::scratch<float>(2, weight_scratch(c_out));
    if (!k.weight(m + ci0 * c_out, c_in * c_out, ci0, ci1, c_in, 0, c_out, grad_weight, work)) {
      finite.store(false, std::memory_order_relaxed);
    }
  });
  if (grad_bias) {
    const at::Tensor bias = sums.sum(0);  // in block order
    const double* bias_data = bias.const_data_ptr<double>();
    for (int64_t co = 0; co < c_out; ++co) grad_bias[co] = static_cast<float>(bias_data[co]);
  }
  return finite.load();
}

}  // namespace

bool weight_gradient(const ConvGeometry& g, const ChannelParts<const float>& src, const ChannelParts<const float>& grad,
                     const ChannelParts<const float>* mask, float* grad_weight, float* grad_bias) {
  if (kPoints * g.in_channels * g.out_channels * 4 <= kFusedWeightBytes) {
    return weight_gradient_fused(g, src, grad, mask, grad_weight, grad_bias);
  }
  const int64_t threads = at::get_num_threads();
  const BlockPlan plan(g, kWgradTiles);
  const int64_t c_in = g.in_channels, c_out = g.out_channels;
  // Groups of consecutive blocks whose Y fits kWgradGroupBytes (one block at least): each group
  // runs phase 1 then phase 2, so Y never holds more than a group (36/16 of a large gradient
  // otherwise; 1.2 GB for 16 x 128 channels at 256x256).
  std::vector<int64_t> first_tile(plan.blocks + 1, 0);  // block b's tiles start at first_tile[b]
  for (int64_t bi = 0; bi < plan.blocks; ++bi) first_tile[bi + 1] = first_tile[bi] + plan.block(bi).tiles();
  const int64_t group_tiles = std::max<int64_t>(1, kWgradGroupBytes / (kPoints * c_out * 4));
  std::vector<int64_t> group_first{0};  // group i is blocks [group_first[i], group_first[i + 1])
  for (int64_t bi = 1; bi < plan.blocks; ++bi)
    if (first_tile[bi + 1] - first_tile[group_first.back()] > group_tiles) group_first.push_back(bi);
  group_first.push_back(plan.blocks);
  const int64_t groups = static_cast<int64_t>(group_first.size()) - 1;
  int64_t y_tiles = 0;
  for (int64_t i = 0; i < groups; ++i) y_tiles = std::max(y_tiles, first_tile[group_first[i + 1]] - first_tile[group_first[i]]);
  const at::TensorOptions options = at::TensorOptions().dtype(at::kFloat);
  at::Tensor y_buffer = cpu::empty_huge({kPoints * y_tiles * c_out}, options);
  at::Tensor sums = at::zeros({plan.blocks, c_out}, options.dtype(at::kDouble));
  float* y_data = y_buffer.mutable_data_ptr<float>();
  double* sums_data = sums.mutable_data_ptr<double>();
  const Kernels& k = kernels();
  // Input-channel blocks: at least two tasks per thread where the channels allow (16 at least);
  // where they do not (many threads, 128 channels), the output channels are split too, each such
  // task transforming its input channels again (the input transform is a small part of a task).
  const int64_t per_task = (c_in + 2 * threads - 1) / (2 * threads);
  const int64_t ci_block = std::clamp<int64_t>((per_task + 15) / 16 * 16, 16, kWgradMaxChannelBlock);
  const int64_t ci_blocks = (c_in + ci_block - 1) / ci_block;
  const int64_t co_split = std::clamp<int64_t>((2 * threads + ci_blocks - 1) / ci_blocks, 1, std::max<int64_t>(1, c_out / 32));
  const int64_t co_block = co_split == 1 ? c_out : ((c_out + co_split - 1) / co_split + 15) / 16 * 16;
  const int64_t co_blocks = (c_out + co_block - 1) / co_block, tasks = ci_blocks * co_blocks;
  // A task's M lives in its thread's scratch when one group serves (the task runs start to end in
  // one parallel region), else in one tensor that outlives the groups' regions.
  const int64_t m_size = kPoints * ci_block * co_block;
  at::Tensor m_all = groups > 1 ? cpu::empty_huge({tasks * m_size}, options) : at::Tensor();
  const int64_t co_group = std::min<int64_t>(c_out, kWgradChannelGroup), co_groups = (c_out + co_group - 1) / co_group;
  std::atomic<bool> finite{true};
  for (int64_t gi = 0; gi < groups; ++gi) {
    const int64_t b_first = group_first[gi], b_end = group_first[gi + 1], tile0 = first_tile[b_first];
    at::parallel_for(0, (b_end - b_first) * co_groups, 1, [&](int64_t t0, int64_t t1) {
      float* work = cpu::scratch<float>(2, grad_scratch(plan.cols));
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t bi = b_first + task / co_groups, co0 = (task % co_groups) * co_group;
        const TileBlock b = plan.block(bi);
        k.grad(g, grad, mask, b, co0, std::min(c_out, co0 + co_group), y_data + kPoints * (first_tile[bi] - tile0) * c_out,
               b.tiles() * c_out, sums_data + bi * c_out + co0, work);
      }
    });
    const bool last = gi + 1 == groups;
    at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
      float* scratch_m = m_all.defined() ? nullptr : cpu::scratch<float>(0, m_size);
      float* v = cpu::scratch<float>(1, kPoints * ci_block * plan.rows * plan.cols);
      float* work = cpu::scratch<float>(2, std::max(transform_scratch(plan.cols), weight_scratch(co_block)));
      for (int64_t task = t0; task < t1; ++task) {
        float* m = m_all.defined() ? m_all.mutable_data_ptr<float>() + task * m_size : scratch_m;
        const int64_t ci0 = (task / co_blocks) * ci_block, count = std::min(ci_block, c_in - ci0);
        const int64_t co0 = (task % co_blocks) * co_block, co_count = std::min(co_block, c_out - co0);
        for (int64_t bi = b_first; bi < b_end; ++bi) {
          const TileBlock b = plan.block(bi);
          const int64_t t_count = b.tiles();
          k.input(g, src, nullptr, b, ci0, ci0 + count, v, count * t_count, work);
          const float* y = y_data + kPoints * (first_tile[bi] - tile0) * c_out + co0;
          for (int64_t p = 0; p < kPoints; ++p) {
            // M_p[ci, co] += V_p[ci, t] Y_p[t, co]
            cpu::gemm(count, co_count, t_count, v + p * count * t_count, t_count, y + p * t_count * c_out, c_out,
                      m + p * count * co_count, co_count, bi > 0);
          }
        }
        if (last && !k.weight(m, count * co_count, ci0, ci0 + count, c_in, co0, co0 + co_count, grad_weight, work)) {
          finite.store(false, std::memory_order_relaxed);
        }
      }
      cpu::gemm_release();
    });
  }
  if (grad_bias) {
    const at::Tensor bias = sums.sum(0);  // in block order
    const double* bias_data = bias.const_data_ptr<double>();
    for (int64_t co = 0; co < c_out; ++co) grad_bias[co] = static_cast<float>(bias_data[co]);
  }
  return finite.load();
}

namespace {

// One 4x4 output tile of the 3x3 correlation of a 6x6 input with a 3x3 filter, float64, by
// winograd.h's tile math (the unit test's reference is F.conv2d).
at::Tensor winograd_tile_cpu(const at::Tensor& input, const at::Tensor& filter) {
  constexpr const char* op = "unet_ext._winograd_tile";
  TORCH_CHECK(input.scalar_type() == at::kDouble && filter.scalar_type() == at::kDouble, op,
              ": input and filter must be float64, got ", input.scalar_type(), " and ", filter.scalar_type());
  TORCH_CHECK(input.sizes().equals({kIn, kIn}), op, ": input must have shape [6, 6], got ", input.sizes());
  TORCH_CHECK(filter.sizes().equals({kKernel, kKernel}), op, ": filter must have shape [3, 3], got ", filter.sizes());
  at::Tensor out = at::empty({kOut, kOut}, input.options());
  convolve_tile(input.contiguous().const_data_ptr<double>(), filter.contiguous().const_data_ptr<double>(),
                out.mutable_data_ptr<double>());
  return out;
}

// The 3x3 weight gradient of one tile: the correlation of a 6x6 input with a 4x4 output gradient,
// float64, by winograd.h's F(3x3, 4x4) (weight_gradient_tile; the reference is F.conv2d).
at::Tensor winograd_wgrad_tile_cpu(const at::Tensor& input, const at::Tensor& grad) {
  constexpr const char* op = "unet_ext._winograd_wgrad_tile";
  TORCH_CHECK(input.scalar_type() == at::kDouble && grad.scalar_type() == at::kDouble, op,
              ": input and grad must be float64, got ", input.scalar_type(), " and ", grad.scalar_type());
  TORCH_CHECK(input.sizes().equals({kIn, kIn}), op, ": input must have shape [6, 6], got ", input.sizes());
  TORCH_CHECK(grad.sizes().equals({kOut, kOut}), op, ": grad must have shape [4, 4], got ", grad.sizes());
  at::Tensor out = at::empty({kKernel, kKernel}, input.options());
  weight_gradient_tile(input.contiguous().const_data_ptr<double>(), grad.contiguous().const_data_ptr<double>(),
                       out.mutable_data_ptr<double>());
  return out;
}

}  // namespace
}  // namespace winograd
}  // namespace unet_ext

TORCH_LIBRARY_IMPL(unet_ext, CPU, m) {
  m.impl("_winograd_tile", &unet_ext::winograd::winograd_tile_cpu);
  m.impl("_winograd_wgrad_tile", &unet_ext::winograd::winograd_wgrad_tile_cpu);
}
