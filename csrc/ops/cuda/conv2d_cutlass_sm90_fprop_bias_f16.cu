// One Hopper conv kernel (fprop + bias, float16), instantiated alone: see conv2d_cutlass_sm90_kernels.cuh.
// Built only with sm_90a in the arch list (setup.py then defines UNET_EXT_SM90A).
#if defined(UNET_EXT_SM90A)
#include "conv2d_cutlass_sm90_kernels.cuh"

namespace unet_ext::conv::sm90 {
UNET_EXT_SM90_FPROP(cutlass::half_t, false, false);
}  // namespace unet_ext::conv::sm90
#endif
