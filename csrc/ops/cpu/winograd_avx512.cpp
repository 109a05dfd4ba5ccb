// The Winograd F(4x4, 3x3) transforms built for AVX-512 (F, BW, VL, DQ).
// winograd.h's transform templates, included below, are defined outside this file's
// `#pragma GCC target` and instantiated on its vector types: GCC warns that their vector returns
// change the ABI (-Wpsabi, an error under CI's -Werror). Always inlined: no call uses that ABI.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "winograd_cpu.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>  // the filter transform's masked loads
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi,bmi2,f16c")
#define UNET_CPU_ISA avx512
#define UNET_CPU_LANES 16  // floats per vector
#include "winograd_kernel.h"
#undef UNET_CPU_ISA
#undef UNET_CPU_LANES
#pragma GCC pop_options
#else  // other processors: the baseline build serves
namespace unet_ext::winograd::avx512 {
void input_transform(const conv::ConvGeometry&, const conv::ChannelParts<const float>&,
                     const conv::ChannelParts<const float>*, const TileBlock&, int64_t, int64_t, float*, int64_t,
                     float*) { TORCH_CHECK(false, "avx512 kernels need x86"); }
bool output_transform(const conv::ConvGeometry&, const float*, int64_t, int64_t, const float*, bool,
                      const conv::ChannelParts<float>&, const TileBlock&, float*) {
  TORCH_CHECK(false, "avx512 kernels need x86");
}
bool output_transform_few(const conv::ConvGeometry&, const float*, int64_t, int64_t, int64_t, int64_t, const float*,
                          bool, const conv::ChannelParts<float>&, const TileBlock&) {
  TORCH_CHECK(false, "avx512 kernels need x86");
}
void filter_transform(const float*, int64_t, int64_t, int64_t, int64_t, int64_t, bool, int64_t, int64_t, float*,
                      double*) {
  TORCH_CHECK(false, "avx512 kernels need x86");
}
void add(float*, const float*, int64_t) { TORCH_CHECK(false, "avx512 kernels need x86"); }
void few_gemm(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t, int64_t, int64_t) {
  TORCH_CHECK(false, "avx512 kernels need x86");
}
void grad_transform(const conv::ConvGeometry&, const conv::ChannelParts<const float>&,
                    const conv::ChannelParts<const float>*, const TileBlock&, int64_t, int64_t, float*, int64_t,
                    double*, float*) { TORCH_CHECK(false, "avx512 kernels need x86"); }
bool weight_transform(const float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float*, float*) {
  TORCH_CHECK(false, "avx512 kernels need x86");
}
}  // namespace unet_ext::winograd::avx512
#endif
