// See huge_pages.h. An allocator that hands blocks of 32 MiB or more out 2 MiB-aligned and marked
// MADV_HUGEPAGE, and anything smaller to torch's CPU allocator.
#include "huge_pages.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace unet_ext {
namespace cpu {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;
// glibc serves smaller blocks from its heap once they have been freed (its mmap threshold grows
// up to 32 MiB), so they come back without faults; larger ones are always fresh mmaps.
constexpr size_t kMinBytes = size_t{32} << 20;

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

void free_huge(void* ptr) { std::free(ptr); }

class HugePageAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    if (bytes < kMinBytes || !enabled()) return c10::GetCPUAllocator()->allocate(bytes);
    const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    void* ptr = nullptr;
    if (posix_memalign(&ptr, kHugePage, rounded) != 0) return c10::GetCPUAllocator()->allocate(bytes);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(ptr, rounded, MADV_HUGEPAGE);  // best effort: with THP off the pages stay 4 KiB
#endif
    return {ptr, ptr, &free_huge, c10::Device(c10::DeviceType::CPU)};
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

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat format) {
  return options.device().is_cpu() ? empty_huge(sizes, options, format)
                                   : at::empty(sizes, options.memory_format(format));
}

}  // namespace cpu
}  // namespace unet_ext
