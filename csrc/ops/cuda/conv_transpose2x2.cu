// conv_transpose2x2 / _conv_transpose2x2_backward on CUDA. Tensor cores (CUTLASS,
// conv_transpose2x2_cutlass.cu) for float16/bfloat16 (and float as TF32 where torch allows it)
// when the channels are 128-bit aligned; otherwise generic kernels on NCHW-contiguous
// tensors (channels_last inputs are converted and the results returned channels_last, as on the
// CPU), accumulating in opmath. Forward: one thread per output pixel; dgrad: one thread per input
// pixel gathering its 2x2 gradient window; wgrad and grad_bias: one block per element, reduced
// in a fixed order (deterministic, no atomics). Weight (C_in, C_out, 2, 2) contiguous.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

#include "../common/checks.h"
#include "../common/dispatch.h"
#include "../conv_host.h"
#include "block_sum.cuh"
#ifdef UNET_EXT_WITH_CUTLASS
#include "conv_transpose2x2_cutlass.h"
#endif

namespace unet_ext {
namespace conv {
namespace {

constexpr const char* kOp = "unet_ext.conv_transpose2x2";
constexpr int kThreads = 256;
constexpr int kReduceThreads = 256;
// An explicit minimum of resident blocks: with a bare __launch_bounds__(256), CUDA 13's ptxas
// caps these kernels at 40 registers and the float64 ones spill; 2 blocks allow up to 128.
constexpr int kMinBlocks = 2;
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;

// out[n, co, 2h + dy, 2w + dx] = bias[co] + sum_ci x[n, ci, h, w] * W[ci, co, dy, dx].
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
up_forward_kernel(const ConvGeometry g, const scalar_t* __restrict__ input,
                  const at::opmath_type<scalar_t>* __restrict__ weight,
                  const at::opmath_type<scalar_t>* __restrict__ bias, scalar_t* __restrict__ output) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t plane = g.out_h * g.out_w, in_plane = g.in_h * g.in_w;
  for (int64_t nc = blockIdx.y; nc < g.batch * g.out_channels; nc += gridDim.y) {
    const int64_t n = nc / g.out_channels, co = nc - n * g.out_channels;
    const acc_t shift = bias != nullptr ? bias[co] : acc_t(0);
    for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < plane;
         p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const int64_t oy = p / g.out_w, ox = p - oy * g.out_w;
      const int64_t h = oy >> 1, w = ox >> 1;
      const acc_t* wp = weight + up_phase(co, oy & 1, ox & 1);  // + ci * 4 * C_out
      const scalar_t* xp = input + n * g.in_channels * in_plane + h * g.in_w + w;
      acc_t acc = acc_t(0);
      for (int64_t ci = 0; ci < g.in_channels; ++ci) {
        acc += static_cast<acc_t>(xp[ci * in_plane]) * wp[ci * 4 * g.out_channels];
      }
      output[nc * plane + p] = static_cast<scalar_t>(acc + shift);
    }
  }
}

// grad_in[n, ci, h, w] = sum_{co, dy, dx} W[ci, co, dy, dx] * g[n, co, 2h + dy, 2w + dx].
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
up_dgrad_kernel(const ConvGeometry g, const scalar_t* __restrict__ grad,
                const at::opmath_type<scalar_t>* __restrict__ weight, scalar_t* __restrict__ grad_input) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t plane = g.in_h * g.in_w, out_plane = g.out_h * g.out_w;
  for (int64_t nc = blockIdx.y; nc < g.batch * g.in_channels; nc += gridDim.y) {
    const int64_t n = nc / g.in_channels, ci = nc - n * g.in_channels;
    const acc_t* wp = weight + ci * 4 * g.out_channels;
    for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < plane;
         p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const int64_t h = p / g.in_w, w = p - h * g.in_w;
      const scalar_t* gp = grad + n * g.out_channels * out_plane + 2 * h * g.out_w + 2 * w;
      acc_t acc = acc_t(0);
      for (int64_t co = 0; co < g.out_channels; ++co) {
        const scalar_t* gc = gp + co * out_plane;
        const acc_t* wc = wp + co * 4;
        acc += static_cast<acc_t>(gc[0]) * wc[0] + static_cast<acc_t>(gc[1]) * wc[1] +
               static_cast<acc_t>(gc[g.out_w]) * wc[2] + static_cast<acc_t>(gc[g.out_w + 1]) * wc[3];
      }
      grad_input[nc * plane + p] = static_cast<scalar_t>(acc);
    }
  }
}

// kBias: grad_bias[co] = sum over (n, oy, ox) of g[n, co, oy, ox]. Otherwise element
// e = (ci * C_out + co) * 4 + dy * 2 + dx of grad_weight = sum_{n, h, w} x[n, ci, h, w] *
// g[n, co, 2h + dy, 2w + dx]. One block per element; warps take rows, lanes columns.
template <typename scalar_t, bool kBias>
__global__ void __launch_bounds__(kReduceThreads, kMinBlocks)
up_wgrad_kernel(const ConvGeometry g, const scalar_t* __restrict__ input,
                const scalar_t* __restrict__ grad, at::opmath_type<scalar_t>* __restrict__ result,
                int64_t elements) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t shared[kReduceThreads / 32];
  constexpr int kWarps = kReduceThreads / 32;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int64_t out_plane = g.out_h * g.out_w, in_plane = g.in_h * g.in_w;
  for (int64_t e = blockIdx.x; e < elements; e += gridDim.x) {
    acc_t acc = acc_t(0);
    if constexpr (kBias) {
      for (int64_t r = warp; r < g.batch * g.out_h; r += kWarps) {
        const int64_t n = r / g.out_h, oy = r - n * g.out_h;
        const scalar_t* row = grad + ((n * g.out_channels + e) * g.out_h + oy) * g.out_w;
        for (int64_t ox = lane; ox < g.out_w; ox += 32) acc += static_cast<acc_t>(row[ox]);
      }
    } else {
      const int64_t dx = e & 1, dy = (e >> 1) & 1, cc = e >> 2;
      const int64_t ci = cc / g.out_channels, co = cc - ci * g.out_channels;
      for (int64_t r = warp; r < g.batch * g.in_h; r += kWarps) {
        const int64_t n = r / g.in_h, h = r - n * g.in_h;
        const scalar_t* xrow = input + (n * g.in_channels + ci) * in_plane + h * g.in_w;
        const scalar_t* grow = grad + (n * g.out_channels + co) * out_plane + (2 * h + dy) * g.out_w + dx;
        for (int64_t w = lane; w < g.in_w; w += 32) {
          acc += static_cast<acc_t>(xrow[w]) * static_cast<acc_t>(grow[2 * w]);
        }
      }
    }
    const acc_t total = block_sum<acc_t, kReduceThreads>(acc, shared);
    if (threadIdx.x == 0) result[e] = total;
  }
}

dim3 plane_grid(int64_t plane, int64_t planes) {
  return dim3(static_cast<unsigned>(std::min<int64_t>((plane + kThreads - 1) / kThreads, kMaxGridY)),
              static_cast<unsigned>(std::min<int64_t>(planes, kMaxGridY)));
}

template <typename scalar_t, bool kBias>
void launch_wgrad(const ConvGeometry& g, const at::Tensor& input, const at::Tensor& grad, at::Tensor& result) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t elements = result.numel();
  if (elements == 0) return;
  up_wgrad_kernel<scalar_t, kBias><<<static_cast<unsigned>(std::min(elements, kMaxBlocks)), kReduceThreads, 0,
                                     at::cuda::getCurrentCUDAStream()>>>(
      g, kBias ? nullptr : input.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(),
      result.mutable_data_ptr<acc_t>(), elements);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor opmath_contiguous(const at::Tensor& t) {
  return t.to(at::toOpMathType(t.scalar_type())).contiguous();
}

// Hopper, 16-bit: the up-conv forward as one cuBLAS GEMM, X [N*H*W, C_in] @ Wm [C_in, 4 C_out] with
// the bias added in the GEMM (one rounding), then one copy that interleaves its four (dy, dx)
// column blocks into the channels_last output. On the first H200 lease the sm_80 CUTLASS strided
// dgrad (below) took 0.26-0.32 ms per level at batch 8 in bf16 against cuDNN's 0.17-0.42; these
// GEMMs (K = C_in = 128-1024) run near the tensor cores' peak, and the copy is one pass.
bool up_forward_as_gemm(const ConvGeometry& g, at::ScalarType dtype) {
  if (dtype != at::kHalf && dtype != at::kBFloat16) return false;
  if (g.batch * g.in_h * g.in_w == 0 || g.in_channels == 0 || g.out_channels == 0) return false;
  return at::cuda::getCurrentDeviceProperties()->major == 9;
}

at::Tensor up_forward_gemm(const ConvGeometry& g, const at::Tensor& input, const at::Tensor& weight,
                           const at::Tensor& bias) {
  const auto cl = at::MemoryFormat::ChannelsLast;
  const int64_t pixels = g.batch * g.in_h * g.in_w, channels = g.out_channels;
  // X: the NHWC input as rows of C_in; Wm: column (dy * 2 + dx) * C_out + co holds W[ci, co, dy, dx].
  const at::Tensor x = input.contiguous(cl).permute({0, 2, 3, 1}).reshape({pixels, g.in_channels});
  const at::Tensor wm = weight.permute({0, 2, 3, 1}).reshape({g.in_channels, 4 * channels});
  const at::Tensor y = bias.defined() ? at::addmm(bias.repeat({4}), x, wm) : at::mm(x, wm);
  at::Tensor output = at::empty({g.batch, channels, g.out_h, g.out_w}, input.options().memory_format(cl));
  // The NHWC output [N, 2H, 2W, C] is [N, H, dy, W, dx, C]; y is [N, H, W, dy, dx, C].
  output.permute({0, 2, 3, 1})
      .view({g.batch, g.in_h, 2, g.in_w, 2, channels})
      .copy_(y.view({g.batch, g.in_h, g.in_w, 2, 2, channels}).permute({0, 1, 3, 2, 4, 5}));
  return output;
}

at::Tensor conv_transpose2x2_cuda(const at::Tensor& input_arg, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias) {
  // The copies and casts below may see tensors that require grad: keep autograd out of them.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const ConvGeometry g = conv_transpose2x2_geometry(kOp, input_arg, weight, bias);  // checks devices
  const c10::cuda::CUDAGuard device_guard(input_arg.device());
  const auto format = conv_output_format(input_arg, weight);
  if (up_forward_as_gemm(g, input_arg.scalar_type())) {
    const at::Tensor out = up_forward_gemm(g, input_arg, weight, bias.has_value() && bias->defined() ? *bias : at::Tensor());
    return format == at::MemoryFormat::ChannelsLast ? out : out.contiguous();
  }
#ifdef UNET_EXT_WITH_CUTLASS
  {
    const at::Tensor b = bias.has_value() && bias->defined() ? *bias : at::Tensor();
    if (at::Tensor fast = conv_transpose2x2_forward_cutlass(g, input_arg, weight, b); fast.defined()) {
      return format == at::MemoryFormat::ChannelsLast ? fast : fast.contiguous();
    }
  }
#endif
  at::Tensor output = at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, input_arg.options());
  if (output.numel() > 0) {
    const at::Tensor input = input_arg.contiguous();
    const at::Tensor w = opmath_contiguous(weight);
    const at::Tensor b = bias.has_value() && bias->defined() ? opmath_contiguous(*bias) : at::Tensor();
    UNET_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv_transpose2x2_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      up_forward_kernel<scalar_t><<<plane_grid(g.out_h * g.out_w, g.batch * g.out_channels), kThreads, 0,
                                    at::cuda::getCurrentCUDAStream()>>>(
          g, input.const_data_ptr<scalar_t>(), w.const_data_ptr<acc_t>(),
          b.defined() ? b.const_data_ptr<acc_t>() : nullptr, output.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return format == at::MemoryFormat::ChannelsLast ? output.contiguous(format) : output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_transpose2x2_backward_cuda(
    const at::Tensor& grad_out_arg, const at::Tensor& input_arg, const at::Tensor& weight,
    std::array<bool, 3> output_mask) {
  constexpr const char* op = "unet_ext._conv_transpose2x2_backward";
  // The copies and casts below may see tensors that require grad: keep autograd out of them.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const ConvGeometry g = conv_transpose2x2_geometry(op, input_arg, weight, std::nullopt);
  UNET_CHECK_SAME_DEVICE(op, input_arg, grad_out_arg);
  const c10::cuda::CUDAGuard device_guard(input_arg.device());
  const std::vector<int64_t> out_shape{g.batch, g.out_channels, g.out_h, g.out_w};
  TORCH_CHECK(grad_out_arg.sizes().equals(out_shape), op, ": grad_out must have shape ",
              at::IntArrayRef(out_shape), ", got ", grad_out_arg.sizes());
  const auto format = conv_memory_format(input_arg);
  at::Tensor grad_input = at::empty({0}, input_arg.options());
  at::Tensor grad_weight = at::empty({0}, weight.options());
  at::Tensor grad_bias = at::empty({0}, weight.options());
  if (!output_mask[0] && !output_mask[1] && !output_mask[2]) return {grad_input, grad_weight, grad_bias};
  // What the tensor cores computed; the generic kernels below compute only the rest.
  bool dgrad_done = false, wgrad_done = false, bgrad_done = false;
#ifdef UNET_EXT_WITH_CUTLASS
  if (grad_out_arg.scalar_type() == input_arg.scalar_type() && (output_mask[0] || output_mask[1])) {
    // Tensor cores for dgrad and wgrad (each falls back alone if CUTLASS declines the problem).
    const at::Tensor grad = grad_out_arg.contiguous(at::MemoryFormat::ChannelsLast);
    if (output_mask[0]) {
      if (at::Tensor dx = conv_transpose2x2_dgrad_cutlass(g, grad, weight); dx.defined()) {
        grad_input = format == at::MemoryFormat::ChannelsLast ? dx : dx.contiguous();
        dgrad_done = true;
      }
    }
    if (output_mask[1]) {
      if (at::Tensor dw = conv_transpose2x2_wgrad_cutlass(g, grad, input_arg, weight.scalar_type()); dw.defined()) {
        grad_weight = dw;
        wgrad_done = true;
      }
    }
    if (output_mask[2] && (dgrad_done || wgrad_done)) {
      // From the channels_last gradient already at hand; ATen's CUDA sum reduces in a fixed order
      // (torch lists it as deterministic).
      grad_bias = grad.sum({0, 2, 3}, false, at::kFloat).to(weight.scalar_type());
      bgrad_done = true;
    }
  }
#endif
  if ((!output_mask[0] || dgrad_done) && (!output_mask[1] || wgrad_done) && (!output_mask[2] || bgrad_done)) {
    return {grad_input, grad_weight, grad_bias};
  }
  const at::Tensor input = input_arg.contiguous();
  const at::Tensor grad_out = grad_out_arg.to(input.scalar_type()).contiguous();
  const auto acc_options = input.options().dtype(at::toOpMathType(input.scalar_type()));
  if (output_mask[0] && !dgrad_done) {
    // The kernel writes every element (a sum over C_out = 0 channels is 0).
    grad_input = at::empty(input.sizes(), input.options());
    if (grad_input.numel() > 0) {
      const at::Tensor w = opmath_contiguous(weight);
      UNET_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv_transpose2x2_dgrad_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        up_dgrad_kernel<scalar_t><<<plane_grid(g.in_h * g.in_w, g.batch * g.in_channels), kThreads, 0,
                                    at::cuda::getCurrentCUDAStream()>>>(
            g, grad_out.const_data_ptr<scalar_t>(), w.const_data_ptr<acc_t>(),
            grad_input.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    if (format == at::MemoryFormat::ChannelsLast) grad_input = grad_input.contiguous(format);
  }
  if (output_mask[1] && !wgrad_done) {
    at::Tensor acc = at::empty(weight.sizes(), acc_options);  // every element written
    UNET_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv_transpose2x2_wgrad_cuda", [&] {
      launch_wgrad<scalar_t, false>(g, input, grad_out, acc);
    });
    grad_weight = acc.to(weight.scalar_type());
  }
  if (output_mask[2] && !bgrad_done) {
    at::Tensor acc = at::empty({g.out_channels}, acc_options);
    UNET_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv_transpose2x2_bgrad_cuda", [&] {
      launch_wgrad<scalar_t, true>(g, input, grad_out, acc);
    });
    grad_bias = acc.to(weight.scalar_type());
  }
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace
}  // namespace conv
}  // namespace unet_ext

TORCH_LIBRARY_IMPL(unet_ext, CUDA, m) {
  m.impl("conv_transpose2x2", &unet_ext::conv::conv_transpose2x2_cuda);
  m.impl("_conv_transpose2x2_backward", &unet_ext::conv::conv_transpose2x2_backward_cuda);
}
