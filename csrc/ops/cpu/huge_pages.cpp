// See huge_pages.h. An allocator that hands blocks of 2 MiB or more out 2 MiB-aligned and marked
// MADV_HUGEPAGE, from a small cache of freed blocks where it can, and anything smaller to torch's
// CPU allocator. Blocks are mapped with mmap, not posix_memalign: glibc serves 2-32 MiB from its
// heap once its dynamic mmap threshold has grown, and free() there need not return the pages,
// so empty_cache() would not shrink the process. The cache's lock is taken around fork()
// (pthread_atfork), so a child forked while another thread allocates finds it unlocked, and the
// cache is built when the library loads (a fork during its first use would leave its guard held).
#include "huge_pages.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <mutex>
#include <vector>

#if defined(__linux__)
#include <pthread.h>
#include <sys/mman.h>
#endif

#include "gemm.h"

namespace unet_ext {
namespace cpu {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;

bool enabled() {
  static const bool on = [] {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const char* env = std::getenv("UNET_EXT_HUGE_PAGES");
    return env == nullptr || std::strcmp(env, "0") != 0;
#else
    return false;
#endif
  }();
  return on;
}

#if defined(__linux__)
// size bytes (a multiple of kHugePage) at a kHugePage-aligned address, or nullptr: an oversized
// mapping with its unaligned head and tail unmapped.
void* map_aligned(size_t size) {
  void* raw = mmap(nullptr, size + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  const auto start = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (start + kHugePage - 1) & ~(uintptr_t{kHugePage} - 1);
  if (aligned > start) munmap(raw, aligned - start);
  const size_t tail = start + size + kHugePage - (aligned + size);
  if (tail > 0) munmap(reinterpret_cast<void*>(aligned + size), tail);
  return reinterpret_cast<void*>(aligned);
}

void unmap(void* ptr, size_t size) { munmap(ptr, size); }
#else
void* map_aligned(size_t size) {
  void* ptr = nullptr;
  return posix_memalign(&ptr, kHugePage, size) == 0 ? ptr : nullptr;
}

void unmap(void* ptr, size_t) { std::free(ptr); }
#endif

// Freed blocks are kept (up to kCacheBytes in all) and handed out again for the same rounded
// size: a training loop allocates the same activation sizes every step, and a reused block has
// neither page faults nor the kernel's zeroing. Oldest blocks go first when the cache is full.
constexpr size_t kCacheBytes = size_t{512} << 20;

struct Block {
  void* ptr;
  size_t bytes;
};

class BlockCache {
 public:
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = blocks_.rbegin(); it != blocks_.rend(); ++it) {
      if (it->bytes == bytes) {
        void* ptr = it->ptr;
        cached_ -= bytes;
        blocks_.erase(std::next(it).base());
        return ptr;
      }
    }
    return nullptr;
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const Block& block : blocks_) unmap(block.ptr, block.bytes);
    blocks_.clear();
    cached_ = 0;
  }

  void give(void* ptr, size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (bytes > kCacheBytes) {
      unmap(ptr, bytes);
      return;
    }
    while (cached_ + bytes > kCacheBytes && !blocks_.empty()) {
      unmap(blocks_.front().ptr, blocks_.front().bytes);
      cached_ -= blocks_.front().bytes;
      blocks_.erase(blocks_.begin());
    }
    blocks_.push_back({ptr, bytes});
    cached_ += bytes;
  }

  // fork() copies the mutex in whatever state another thread left it: hold it across the fork.
  void lock() { mutex_.lock(); }
  void unlock() { mutex_.unlock(); }

 private:
  std::mutex mutex_;
  std::vector<Block> blocks_;
  size_t cached_ = 0;
};

// Leaked on purpose: tensors may be freed during static destruction at exit.
BlockCache& cache() {
  static BlockCache* instance = [] {
    auto* created = new BlockCache();
#if defined(__linux__)
    // prepare runs in the forking thread; parent and child resume in that same thread.
    pthread_atfork([] { cache().lock(); }, [] { cache().unlock(); }, [] { cache().unlock(); });
#endif
    return created;
  }();
  return *instance;
}

// Built while the library loads, in one thread, before anything can fork: a child forked while
// another thread is inside the first call of cache() (or enabled(), or the brgemm probe) waits
// forever on that static's guard, the thread that holds it being gone, in its first big output
// (or GEMM). The window is not short: registering the fork handlers waits for the handlers of a
// fork under way in another thread, so a fork that starts first always lands inside it.
[[maybe_unused]] const bool initialized_at_load = (enabled(), cache(), float_brgemm_available(), true);

void release(void* context) {
  auto* block = static_cast<Block*>(context);
  cache().give(block->ptr, block->bytes);
  delete block;
}

class HugePageAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    if (bytes < kHugePage || !enabled()) return c10::GetCPUAllocator()->allocate(bytes);
    const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    void* ptr = cache().take(rounded);
    if (ptr == nullptr) {
      ptr = map_aligned(rounded);
      if (ptr == nullptr) {  // out of memory (or address space): give the cached blocks back, retry
        cache().clear();
        ptr = map_aligned(rounded);
      }
      if (ptr == nullptr) return c10::GetCPUAllocator()->allocate(bytes);  // torch's error if it fails too
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      madvise(ptr, rounded, MADV_HUGEPAGE);  // best effort: with THP off the pages stay 4 KiB
#endif
    }
    return {ptr, new Block{ptr, rounded}, &release, c10::Device(c10::DeviceType::CPU)};
  }

  // Blocks carry their own deleters (ours or torch's), so there is no single raw deleter.
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

HugePageAllocator allocator;

}  // namespace

at::Tensor empty_huge(at::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat format) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu());
  return at::detail::empty_generic(sizes, &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), format);
}

void empty_cache() {
  cache().clear();
  // The conv kernels' per-thread scratch (gemm.h): each thread of the team frees its own. The
  // range is longer than any team, so every thread gets a task, also where the team is larger
  // than at::get_num_threads() (partials.h).
  at::parallel_for(0, int64_t{1} << 16, 1, [](int64_t, int64_t) { release_scratch(); });
  release_scratch();
}

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat format) {
  return options.device().is_cpu() ? empty_huge(sizes, options, format)
                                   : at::empty(sizes, options.memory_format(format));
}

}  // namespace cpu
}  // namespace unet_ext
