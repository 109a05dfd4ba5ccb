// Activation-sized CPU outputs without page faults. A fresh at::empty above glibc's mmap
// threshold pays one page fault (and a 4 KiB zeroing) per page on first touch: the paper's 79 MB
// crop_concat output fills in 49 ms fresh against 7 ms preallocated on the 2-core CI machine
// (1 thread). Blocks of 2 MiB or more therefore come 2 MiB-aligned and marked MADV_HUGEPAGE (one
// fault per 2 MiB: 12 ms; torch does this under THP_MEM_ALLOC_ENABLE=1), and freed ones are
// cached (512 MiB at most) for the next output of the same size, which then costs nothing: a
// training step allocates the same sizes every time. UNET_EXT_HUGE_PAGES=0 turns all of it off.
// Where the kernel has THP off, the pages are ordinary ones (the cache still helps).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/MemoryFormat.h>
#include <c10/core/TensorOptions.h>

namespace unet_ext {
namespace cpu {

// at::empty(sizes, options.memory_format(format)) for a CPU tensor; 2 MiB or more from the
// huge-page cache. options must be on the CPU.
at::Tensor empty_huge(at::IntArrayRef sizes, const at::TensorOptions& options,
                      at::MemoryFormat format = at::MemoryFormat::Contiguous);

// empty_huge on the CPU, at::empty elsewhere (host code shared by the CPU and CUDA ops).
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options,
                        at::MemoryFormat format = at::MemoryFormat::Contiguous);

// Returns the cached free blocks to the system (outputs still alive are not affected).
void empty_cache();

}  // namespace cpu
}  // namespace unet_ext
