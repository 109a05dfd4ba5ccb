// Partial sums under at::parallel_for, indexed by part, never by OpenMP thread number. A parallel
// region's team is whatever the OpenMP runtime serving the region makes it (at::parallel_for has
// no num_threads clause), which need not be at::get_num_threads(): with another runtime answering
// torch's omp_get_max_threads (a second OpenMP runtime in the process, a clang -fopenmp build) a
// buffer per get_num_threads() thread indexed by at::get_thread_num() runs past its end.
// Usage: parts = partial_count(n); at::parallel_for(0, parts, 1, [&](p0, p1) { buffers once;
// for p in [p0, p1): items [part_begin(n, parts, p), part_begin(n, parts, p + 1)) into part p }).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace unet_ext {
namespace cpu {

// One part per thread torch would use, at most one per item, at least one.
inline int64_t partial_count(int64_t items) {
  return std::max<int64_t>(1, std::min<int64_t>(items, at::get_num_threads()));
}

// First item of part p of [0, items) split into `parts` near-equal contiguous ranges.
inline int64_t part_begin(int64_t items, int64_t parts, int64_t p) { return items * p / parts; }

}  // namespace cpu
}  // namespace unet_ext
