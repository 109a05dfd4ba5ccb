// Activation-sized CPU outputs in transparent huge pages. A fresh at::empty above glibc's mmap
// threshold (at most 32 MiB) pays one page fault (and a 4 KiB zeroing) per page on first touch:
// the paper's 79 MB crop_concat output fills in 49 ms fresh against 7 ms preallocated on the
// 2-core CI machine (1 thread). 2 MiB-aligned memory marked MADV_HUGEPAGE faults once per 2 MiB
// (12 ms). torch's own CPU allocator does this under THP_MEM_ALLOC_ENABLE=1 (from 2 MiB);
// unet_ext does it for its outputs of 32 MiB or more by default (UNET_EXT_HUGE_PAGES=0 turns it
// off; smaller blocks are reused from glibc's heap without faults). Where the kernel has THP
// off, this is plain memory.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/MemoryFormat.h>
#include <c10/core/TensorOptions.h>

namespace unet_ext {
namespace cpu {

// at::empty(sizes, options.memory_format(format)) for a CPU tensor, in
// huge pages when it is 32 MiB or more. options must be on the CPU.
at::Tensor empty_huge(at::IntArrayRef sizes, const at::TensorOptions& options,
                      at::MemoryFormat format = at::MemoryFormat::Contiguous);

// empty_huge on the CPU, at::empty elsewhere (host code shared by the CPU and CUDA ops).
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options,
                        at::MemoryFormat format = at::MemoryFormat::Contiguous);

}  // namespace cpu
}  // namespace unet_ext
