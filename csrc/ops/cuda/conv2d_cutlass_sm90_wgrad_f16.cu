// One Hopper conv kernel (wgrad (fp32 dW), float16), instantiated alone: see conv2d_cutlass_sm90_kernels.cuh.
// Built only with sm_90a in the arch list (setup.py then defines UNET_EXT_SM90A).
#if defined(UNET_EXT_SM90A)
#include "conv2d_cutlass_sm90_kernels.cuh"

namespace unet_ext::conv::sm90 {
UNET_EXT_SM90_WGRAD(cutlass::half_t);
}  // namespace unet_ext::conv::sm90
#endif
