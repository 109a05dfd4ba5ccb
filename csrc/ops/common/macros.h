// Portability macros shared by CPU (.cpp) and CUDA (.cu) translation units.
// Math headers mark their functions UNET_HD so that the CPU kernels, the CUDA kernels and
// dev harnesses compute literally the same thing; these headers must stay torch-free.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define UNET_HD __host__ __device__ __forceinline__
#else
#define UNET_HD inline
#endif
