// See huge_pages.h. An allocator that hands blocks of 2 MiB or more out 2 MiB-aligned and marked
// MADV_HUGEPAGE, from a small cache of freed blocks where it can, and anything smaller to torch's
// CPU allocator.
#include "huge_pages.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <cstdlib>
#include <cstring>
#include <iterator>
#include <mutex>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

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
    for (const Block& block : blocks_) std::free(block.ptr);
    blocks_.clear();
    cached_ = 0;
  }

  void give(void* ptr, size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (bytes > kCacheBytes) {
      std::free(ptr);
      return;
    }
    while (cached_ + bytes > kCacheBytes && !blocks_.empty()) {
      std::free(blocks_.front().ptr);
      cached_ -= blocks_.front().bytes;
      blocks_.erase(blocks_.begin());
    }
    blocks_.push_back({ptr, bytes});
    cached_ += bytes;
  }

 private:
  std::mutex mutex_;
  std::vector<Block> blocks_;
  size_t cached_ = 0;
};

// Leaked on purpose: tensors may be freed during static destruction at exit.
BlockCache& cache() {
  static BlockCache* instance = new BlockCache();
  return *instance;
}

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
      if (posix_memalign(&ptr, kHugePage, rounded) != 0) return c10::GetCPUAllocator()->allocate(bytes);
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

void empty_cache() { cache().clear(); }

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat format) {
  return options.device().is_cpu() ? empty_huge(sizes, options, format)
                                   : at::empty(sizes, options.memory_format(format));
}

}  // namespace cpu
}  // namespace unet_ext
