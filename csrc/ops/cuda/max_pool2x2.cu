// max_pool2x2 on CUDA: one thread per output element (forward) or per window (backward), in
// the dense layout of the input, so consecutive threads touch consecutive output elements:
// along W (NCHW) or along C (channels_last). The backward recomputes the window's argmax from
// the input (max_pool2x2.h) and writes all four gradient elements of its window; an odd last
// row or column is zeroed by threads of its own. 64-bit indices throughout.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../common/dispatch.h"
#include "../max_pool2x2_host.h"

namespace unet_ext {
namespace max_pool {
namespace {

constexpr int kThreads = 256;

// For output element `i` (its offset in the dense output): the offset of its window's top-left
// input element, and the steps to the right and lower neighbours.
struct Window {
  int64_t top_left, right, down;
};

__device__ __forceinline__ Window window_of(const Geometry& g, int64_t i) {
  if (g.channels_last) {
    const int64_t c = i % g.channels;
    int64_t rest = i / g.channels;
    const int64_t ow = rest % g.out_w;
    rest /= g.out_w;
    const int64_t oh = rest % g.out_h, n = rest / g.out_h;
    return {((n * g.in_h + 2 * oh) * g.in_w + 2 * ow) * g.channels + c, g.channels, g.in_w * g.channels};
  }
  const int64_t ow = i % g.out_w;
  int64_t rest = i / g.out_w;
  const int64_t oh = rest % g.out_h, plane = rest / g.out_h;
  return {(plane * g.in_h + 2 * oh) * g.in_w + 2 * ow, 1, g.in_w};
}

template <typename scalar_t>
__global__ void forward_kernel(Geometry g, int64_t outputs, const scalar_t* __restrict__ in,
                               scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < outputs;
       i += int64_t{gridDim.x} * blockDim.x) {
    const Window w = window_of(g, i);
    const scalar_t* p = in + w.top_left;
    out[i] = static_cast<scalar_t>(window_max<acc_t>(p[0], p[w.right], p[w.down], p[w.down + w.right]));
  }
}

template <typename scalar_t>
__global__ void backward_kernel(Geometry g, int64_t outputs, const scalar_t* __restrict__ grad_out,
                                const scalar_t* __restrict__ in, scalar_t* __restrict__ grad_in) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t zero(0);
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < outputs;
       i += int64_t{gridDim.x} * blockDim.x) {
    const Window w = window_of(g, i);
    const scalar_t* p = in + w.top_left;
    const int index = window_argmax(window_takes<acc_t>(p[0], p[w.right], p[w.down], p[w.down + w.right]));
    const scalar_t value = grad_out[i];
    scalar_t* d = grad_in + w.top_left;
    d[0] = index == 0 ? value : zero;
    d[w.right] = index == 1 ? value : zero;
    d[w.down] = index == 2 ? value : zero;
    d[w.down + w.right] = index == 3 ? value : zero;
  }
}

// Zeroes the input elements no window covers: the last row when H is odd, the last column when
// W is odd. Only launched for odd sizes (same-padding U-Nets on odd inputs), so a plain pass over
// grad_in's index space that writes just those elements is enough.
template <typename scalar_t>
__global__ void zero_rim_kernel(Geometry g, int64_t elements, scalar_t* __restrict__ grad_in) {
  const int64_t C = g.channels;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < elements;
       i += int64_t{gridDim.x} * blockDim.x) {
    // i enumerates (n, c, h, w) in NCHW order; keep only the uncovered ones.
    const int64_t w = i % g.in_w;
    int64_t rest = i / g.in_w;
    const int64_t h = rest % g.in_h;
    rest /= g.in_h;
    const int64_t c = rest % C, n = rest / C;
    if (h < 2 * g.out_h && w < 2 * g.out_w) continue;
    const int64_t offset = g.channels_last ? ((n * g.in_h + h) * g.in_w + w) * C + c
                                           : ((n * C + c) * g.in_h + h) * g.in_w + w;
    grad_in[offset] = scalar_t(0);
  }
}

int blocks_for(int64_t work) {
  const int64_t max_blocks = 32LL * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, max_blocks)));
}

at::Tensor max_pool2x2_cuda(const at::Tensor& input_arg) {
  const c10::cuda::CUDAGuard device_guard(input_arg.device());
  at::Tensor input = input_arg, out;
  const Geometry g = forward_geometry(input, out);
  const int64_t outputs = out.numel();
  if (outputs == 0) return out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  UNET_DISPATCH_FLOATING_TYPES(input.scalar_type(), "max_pool2x2_cuda", [&] {
    forward_kernel<scalar_t><<<blocks_for(outputs), kThreads, 0, stream>>>(
        g, outputs, input.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor max_pool2x2_backward_cuda(const at::Tensor& grad_out_arg, const at::Tensor& input_arg) {
  at::Tensor grad_out = grad_out_arg, input = input_arg, grad_input;
  const Geometry g = backward_geometry(grad_out, input, grad_input);  // checks devices
  const c10::cuda::CUDAGuard device_guard(input_arg.device());
  if (grad_input.numel() == 0) return grad_input;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t outputs = grad_out.numel();  // > 0: H, W >= 2 and grad_input is not empty
  const bool rim = g.in_h % 2 == 1 || g.in_w % 2 == 1;
  UNET_DISPATCH_FLOATING_TYPES(input.scalar_type(), "max_pool2x2_backward_cuda", [&] {
    backward_kernel<scalar_t><<<blocks_for(outputs), kThreads, 0, stream>>>(
        g, outputs, grad_out.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
        grad_input.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (rim) {
      zero_rim_kernel<scalar_t><<<blocks_for(grad_input.numel()), kThreads, 0, stream>>>(
          g, grad_input.numel(), grad_input.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return grad_input;
}

}  // namespace
}  // namespace max_pool
}  // namespace unet_ext

TORCH_LIBRARY_IMPL(unet_ext, CUDA, m) {
  m.impl("max_pool2x2", &unet_ext::max_pool::max_pool2x2_cuda);
  m.impl("_max_pool2x2_backward", &unet_ext::max_pool::max_pool2x2_backward_cuda);
}
