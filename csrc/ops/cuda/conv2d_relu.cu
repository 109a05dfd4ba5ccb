// conv2d_relu / conv2d_bias / _conv2d_backward on CUDA. float16/bfloat16 with 8-aligned channels
// run CUTLASS tensor-core implicit GEMMs (conv2d_cutlass.cu, NHWC) for fprop, dgrad and wgrad;
// the rest runs generic direct kernels on NCHW-contiguous tensors in opmath: one thread per output
// pixel (dgrad: the same kernel on the masked gradient and the flipped, transposed weight), and
// one block per weight/bias element for wgrad, reduced in a fixed order (no atomics).
// conv2d_relu_concat: the generic kernels read their input (and dgrad writes its output) through
// ChannelParts (conv2d_relu.h), so an input channel index picks the skip's crop window or up;
// the CUTLASS shapes materialise the concatenation for now (see conv2d_relu_concat_cuda).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
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
#include "conv2d_cutlass.h"
#endif

namespace unet_ext {
namespace conv {
namespace {

constexpr int kThreads = 256;
constexpr int kReduceThreads = 256;
// An explicit minimum of resident blocks: with a bare __launch_bounds__(256), CUDA 13's ptxas
// caps these kernels at 40 registers and the float64 ones spill; 2 blocks allow up to 128.
constexpr int kMinBlocks = 2;
constexpr int64_t kChunkChannels = 8;  // conv_direct_kernel's partial sums: 8 channels' taps each
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;  // grid-stride loops cover the rest

// dst[n, co, oh, ow] = [relu](bias[co] + sum_{ci, ky, kx} w[co, ci, ky, kx] *
// src[n, ci, oh + ky - pad_h, ow + kx - pad_w]), src read as 0 outside the image and, when
// kMasked, where mask <= 0 (mask = the forward output: dgrad of ReLU; src is then one dense
// part and mask has its layout). Padding may be negative (dgrad with padding > k - 1): it is
// only an offset between output and input rows.
template <typename scalar_t, bool kRelu, bool kMasked>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
conv_direct_kernel(const ConvGeometry g, const ChannelParts<const scalar_t> src,
                   const scalar_t* __restrict__ mask, const at::opmath_type<scalar_t>* __restrict__ weight,
                   const at::opmath_type<scalar_t>* __restrict__ bias, const ChannelParts<scalar_t> dst) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t plane = g.out_h * g.out_w;
  const int64_t planes = g.batch * g.out_channels, kernel = g.kernel_h * g.kernel_w;
  for (int64_t nc = blockIdx.y; nc < planes; nc += gridDim.y) {
    const int64_t n = nc / g.out_channels, co = nc - n * g.out_channels;
    const acc_t* w = weight + co * g.in_channels * kernel;
    scalar_t* out = dst.channel(n, co);
    const int64_t out_pitch = dst.row_stride(co);
    const acc_t shift = bias != nullptr ? bias[co] : acc_t(0);
    for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < plane;
         p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const int64_t oh = p / g.out_w, ow = p - oh * g.out_w;
      // Taps that read inside the image: ih = oh + ky - pad_h in [0, in_h), same for columns.
      const int64_t ky0 = std::max<int64_t>(0, g.pad_h - oh);
      const int64_t ky1 = std::min<int64_t>(g.kernel_h, g.in_h + g.pad_h - oh);
      const int64_t kx0 = std::max<int64_t>(0, g.pad_w - ow);
      const int64_t kx1 = std::min<int64_t>(g.kernel_w, g.in_w + g.pad_w - ow);
      // Two-level sum: a partial over kChunkChannels channels' taps, added to the total once per
      // chunk, so the rounding error grows with the chunk plus the chunk count, not with all
      // C_in*k*k terms (one running float32 sum over 600 channels had 5x cuDNN's error).
      acc_t acc = acc_t(0);
      for (int64_t c0 = 0; c0 < g.in_channels; c0 += kChunkChannels) {
        const int64_t c1 = std::min<int64_t>(g.in_channels, c0 + kChunkChannels);
        acc_t part = acc_t(0);
        for (int64_t ci = c0; ci < c1; ++ci) {
          const acc_t* wc = w + ci * kernel;
          const scalar_t* channel = src.channel(n, ci);
          const int64_t pitch = src.row_stride(ci);
          for (int64_t ky = ky0; ky < ky1; ++ky) {
            // Offset of input column 0 of this row: ow - pad_w + kx >= 0 for kx >= kx0.
            const int64_t row = (oh + ky - g.pad_h) * pitch + ow - g.pad_w;
            for (int64_t kx = kx0; kx < kx1; ++kx) {
              acc_t v = static_cast<acc_t>(channel[row + kx]);
              if constexpr (kMasked) {
                // A select, not `v * (m > 0)`: a masked-off NaN/inf gradient gives 0; a NaN
                // output passes the gradient (torch's threshold_backward zeroes where out <= 0).
                if (static_cast<acc_t>(mask[(channel - src.data[0]) + row + kx]) <= acc_t(0)) v = acc_t(0);
              }
              part += v * wc[ky * g.kernel_w + kx];
            }
          }
        }
        acc += part;
      }
      acc += shift;
      if constexpr (kRelu) acc = acc < acc_t(0) ? acc_t(0) : acc;  // keeps NaN, as torch.relu
      out[oh * out_pitch + ow] = static_cast<scalar_t>(acc);
    }
  }
}

// grad_weight[co, ci, ky, kx] = sum_{n, oh, ow} gm[n, co, oh, ow] * x[n, ci, oh+ky-pad, ow+kx-pad]
// and (kBias) grad_bias[co] = sum gm[n, co, :, :], gm = grad_out zeroed where output <= 0 when
// kMasked. One block per element (grid-stride); warps take (n, oh) rows, lanes columns; the
// sum's order depends only on the shapes, so results are bit-identical run to run.
template <typename scalar_t, bool kMasked, bool kBias>
__global__ void __launch_bounds__(kReduceThreads, kMinBlocks)
conv_wgrad_kernel(const ConvGeometry g, const ChannelParts<const scalar_t> input,
                  const scalar_t* __restrict__ grad, const scalar_t* __restrict__ mask,
                  at::opmath_type<scalar_t>* __restrict__ result, int64_t elements) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t shared[kReduceThreads / 32];
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  constexpr int kWarps = kReduceThreads / 32;
  const int64_t out_plane = g.out_h * g.out_w;
  for (int64_t e = blockIdx.x; e < elements; e += gridDim.x) {
    int64_t co = e, ci = 0, ky = 0, kx = 0;
    if constexpr (!kBias) {
      kx = e % g.kernel_w;
      int64_t t = e / g.kernel_w;
      ky = t % g.kernel_h;
      t /= g.kernel_h;
      ci = t % g.in_channels;
      co = t / g.in_channels;
    }
    // Output rows/columns whose tap (ky, kx) reads inside the image (all of them for the bias).
    const int64_t oh0 = kBias ? 0 : std::clamp<int64_t>(g.pad_h - ky, 0, g.out_h);
    const int64_t oh1 = kBias ? g.out_h : std::clamp<int64_t>(g.in_h + g.pad_h - ky, oh0, g.out_h);
    const int64_t ow0 = kBias ? 0 : g.first_valid_col(kx);
    const int64_t ow1 = kBias ? g.out_w : g.last_valid_col(kx);
    const int64_t rows = oh1 - oh0;
    const int64_t pitch = kBias ? 0 : input.row_stride(ci);
    acc_t acc = acc_t(0);
    for (int64_t r = warp; r < g.batch * rows; r += kWarps) {
      const int64_t n = r / rows, oh = oh0 + (r - n * rows);
      const int64_t grow = (n * g.out_channels + co) * out_plane + oh * g.out_w;
      const scalar_t* xrow = nullptr;
      if constexpr (!kBias) xrow = input.channel(n, ci) + (oh + ky - g.pad_h) * pitch + kx - g.pad_w;
      for (int64_t ow = ow0 + lane; ow < ow1; ow += 32) {
        acc_t gv = static_cast<acc_t>(grad[grow + ow]);
        if constexpr (kMasked) {
          if (static_cast<acc_t>(mask[grow + ow]) <= acc_t(0)) gv = acc_t(0);
        }
        if constexpr (kBias) {
          acc += gv;
        } else {
          acc += gv * static_cast<acc_t>(xrow[ow]);
        }
      }
    }
    const acc_t total = block_sum<acc_t, kReduceThreads>(acc, shared);
    if (threadIdx.x == 0) result[e] = total;
  }
}

// The first layer: a thin input (C_in <= 4: grey, RGB) into many channels. It is memory-bound (the
// paper's 1 -> 64 layer at batch 8 writes 333 MB of bf16, ~0.07 ms at 4.8 TB/s; its 1.5 G
// multiply-adds are ~0.05 ms on the CUDA cores), yet cuDNN took 1.31 ms on the H200 and our
// zero-padded tensor-core path 3.86 ms (a K = 72 GEMM). One thread computes kThinGroup output
// channels of one pixel from the C_in*k*k taps it loads once, the weights (opmath) broadcast from
// shared memory, and writes them in either layout (NHWC: 16-byte vector stores); the input is read
// through its strides, any layout.
at::Tensor opmath_contiguous(const at::Tensor& t);

constexpr int kThinGroup = 16;
constexpr int64_t kThinMaxInChannels = 4;
constexpr int64_t kThinMaxKernel = 7;

struct Strides4 {
  int64_t n, c, h, w;
};

template <typename scalar_t, bool kRelu, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads, kMinBlocks)  // 16 accumulators: a bare bound spills on sm_80
conv_thin_input_kernel(const ConvGeometry g, const scalar_t* __restrict__ input, const Strides4 in,
                       const at::opmath_type<scalar_t>* __restrict__ weight,
                       const at::opmath_type<scalar_t>* __restrict__ bias, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char thin_shared[];
  acc_t* group_weight = reinterpret_cast<acc_t*>(thin_shared);  // [kThinGroup][taps]
  const int64_t taps = g.in_channels * g.kernel_h * g.kernel_w;
  const int64_t co0 = static_cast<int64_t>(blockIdx.y) * kThinGroup;
  const int channels = static_cast<int>(std::min<int64_t>(kThinGroup, g.out_channels - co0));
  for (int64_t i = threadIdx.x; i < kThinGroup * taps; i += blockDim.x) {
    const int64_t j = i / taps;
    group_weight[i] = j < channels ? weight[(co0 + j) * taps + (i - j * taps)] : acc_t(0);
  }
  __syncthreads();
  const int64_t plane = g.out_h * g.out_w, pixels = g.batch * plane;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < pixels;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = p / plane, r = p - n * plane, oh = r / g.out_w, ow = r - oh * g.out_w;
    acc_t acc[kThinGroup];
#pragma unroll
    for (int j = 0; j < kThinGroup; ++j) acc[j] = bias != nullptr && j < channels ? bias[co0 + j] : acc_t(0);
    const scalar_t* image = input + n * in.n;
    int64_t t = 0;
    for (int64_t ci = 0; ci < g.in_channels; ++ci) {
      for (int64_t ky = 0; ky < g.kernel_h; ++ky) {
        const int64_t ih = oh + ky - g.pad_h;
        for (int64_t kx = 0; kx < g.kernel_w; ++kx, ++t) {
          const int64_t iw = ow + kx - g.pad_w;
          const acc_t v = ih >= 0 && ih < g.in_h && iw >= 0 && iw < g.in_w
                              ? static_cast<acc_t>(image[ci * in.c + ih * in.h + iw * in.w])
                              : acc_t(0);
#pragma unroll
          for (int j = 0; j < kThinGroup; ++j) acc[j] += v * group_weight[j * taps + t];
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kThinGroup; ++j) {
      if constexpr (kRelu) acc[j] = acc[j] < acc_t(0) ? acc_t(0) : acc[j];  // keeps NaN, as torch.relu
    }
    if constexpr (kChannelsLast) {
      scalar_t* row = out + p * g.out_channels + co0;  // NHWC: p = (n, oh, ow) row-major
      constexpr int kVector = 16 / static_cast<int>(sizeof(scalar_t));
      if (channels == kThinGroup && g.out_channels % kVector == 0 &&
          reinterpret_cast<uintptr_t>(row) % 16 == 0) {
#pragma unroll
        for (int j0 = 0; j0 < kThinGroup; j0 += kVector) {
          union {
            uint4 bits;
            scalar_t values[kVector];
          } pack;
#pragma unroll
          for (int j = 0; j < kVector; ++j) pack.values[j] = static_cast<scalar_t>(acc[j0 + j]);
          *reinterpret_cast<uint4*>(row + j0) = pack.bits;
        }
      } else {
#pragma unroll
        for (int j = 0; j < kThinGroup; ++j) {
          if (j < channels) row[j] = static_cast<scalar_t>(acc[j]);
        }
      }
    } else {
      scalar_t* column = out + (n * g.out_channels + co0) * plane + r;  // NCHW
#pragma unroll
      for (int j = 0; j < kThinGroup; ++j) {
        if (j < channels) column[j * plane] = static_cast<scalar_t>(acc[j]);
      }
    }
  }
}

bool thin_input_fits(const ConvGeometry& g) {
  return g.in_channels >= 1 && g.in_channels <= kThinMaxInChannels && g.kernel_h <= kThinMaxKernel &&
         g.kernel_w <= kThinMaxKernel && g.out_channels >= 1;
}

// The output of a thin-input convolution in `format`; launches nothing when it is empty.
at::Tensor conv_thin_input(const ConvGeometry& g, const at::Tensor& input, const at::Tensor& weight,
                           const at::Tensor& bias, bool relu, at::MemoryFormat format) {
  at::Tensor output = at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, input.options().memory_format(format));
  const int64_t pixels = g.batch * g.out_h * g.out_w;
  if (pixels == 0) return output;
  const bool channels_last = format == at::MemoryFormat::ChannelsLast;
  if (channels_last && !output.is_contiguous(format)) output = output.contiguous(format);
  const at::Tensor w = opmath_contiguous(weight);
  const at::Tensor b = bias.defined() ? opmath_contiguous(bias) : at::Tensor();
  const Strides4 in{input.stride(0), input.stride(1), input.stride(2), input.stride(3)};
  const int64_t groups = (g.out_channels + kThinGroup - 1) / kThinGroup;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>((pixels + kThreads - 1) / kThreads, kMaxBlocks)),
                  static_cast<unsigned>(groups));
  UNET_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv_thin_input_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t shared = static_cast<size_t>(kThinGroup) * g.in_channels * g.kernel_h * g.kernel_w * sizeof(acc_t);
    const auto stream = at::cuda::getCurrentCUDAStream();
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const acc_t* wp = w.const_data_ptr<acc_t>();
    const acc_t* bp = b.defined() ? b.const_data_ptr<acc_t>() : nullptr;
    scalar_t* y = output.mutable_data_ptr<scalar_t>();
    if (relu && channels_last) {
      conv_thin_input_kernel<scalar_t, true, true><<<grid, kThreads, shared, stream>>>(g, x, in, wp, bp, y);
    } else if (relu) {
      conv_thin_input_kernel<scalar_t, true, false><<<grid, kThreads, shared, stream>>>(g, x, in, wp, bp, y);
    } else if (channels_last) {
      conv_thin_input_kernel<scalar_t, false, true><<<grid, kThreads, shared, stream>>>(g, x, in, wp, bp, y);
    } else {
      conv_thin_input_kernel<scalar_t, false, false><<<grid, kThreads, shared, stream>>>(g, x, in, wp, bp, y);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

// A dense NCHW tensor of g's input (or output) shape as ChannelParts.
template <typename scalar_t>
ChannelParts<const scalar_t> input_parts(const ConvGeometry& g, const at::Tensor& t) {
  return dense_parts(t.const_data_ptr<scalar_t>(), g.in_channels, g.in_h, g.in_w);
}

template <typename scalar_t>
ChannelParts<scalar_t> output_parts(const ConvGeometry& g, at::Tensor& t) {
  return dense_parts(t.mutable_data_ptr<scalar_t>(), g.out_channels, g.out_h, g.out_w);
}

// Launches nothing for an empty output (a zero grid dimension is a launch error).
template <typename scalar_t, bool kRelu, bool kMasked>
void launch_direct(const ConvGeometry& g, const ChannelParts<const scalar_t>& src, const at::Tensor& mask,
                   const at::Tensor& weight, const at::Tensor& bias, const ChannelParts<scalar_t>& dst) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t plane = g.out_h * g.out_w;
  if (plane == 0 || g.batch * g.out_channels == 0) return;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>((plane + kThreads - 1) / kThreads, kMaxGridY)),
                  static_cast<unsigned>(std::min<int64_t>(g.batch * g.out_channels, kMaxGridY)));
  conv_direct_kernel<scalar_t, kRelu, kMasked><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      g, src, kMasked ? mask.const_data_ptr<scalar_t>() : nullptr,
      weight.const_data_ptr<acc_t>(), bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr, dst);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, bool kMasked, bool kBias>
void launch_wgrad(const ConvGeometry& g, const ChannelParts<const scalar_t>& input, const at::Tensor& grad,
                  const at::Tensor& mask, at::Tensor& result) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t elements = result.numel();
  if (elements == 0) return;
  const unsigned blocks = static_cast<unsigned>(std::min(elements, kMaxBlocks));
  conv_wgrad_kernel<scalar_t, kMasked, kBias><<<blocks, kReduceThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      g, input, grad.const_data_ptr<scalar_t>(),
      kMasked ? mask.const_data_ptr<scalar_t>() : nullptr, result.mutable_data_ptr<acc_t>(), elements);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor opmath_contiguous(const at::Tensor& t) {
  return t.to(at::toOpMathType(t.scalar_type())).contiguous();
}

at::Tensor conv2d_forward_cuda(const char* op, const at::Tensor& input_arg, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, int64_t padding, bool relu) {
  // The copies and casts below may see tensors that require grad: keep autograd out of them.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const ConvGeometry g = conv2d_geometry(op, input_arg, weight, bias, padding);  // checks devices
  const c10::cuda::CUDAGuard device_guard(input_arg.device());
  const auto format = conv_output_format(input_arg, weight);
  const at::Tensor bias_arg = bias.has_value() && bias->defined() ? *bias : at::Tensor();
  if (g.batch * g.out_channels * g.out_h * g.out_w == 0) {
    return at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, input_arg.options().memory_format(format));
  }
  if (thin_input_fits(g)) return conv_thin_input(g, input_arg, weight, bias_arg, relu, format);
#ifdef UNET_EXT_WITH_CUTLASS
  // Tensor cores when the problem fits CUTLASS's constraints; its output is channels_last.
  if (at::Tensor fast = conv2d_forward_cutlass(g, input_arg, weight, bias_arg, relu); fast.defined()) {
    return format == at::MemoryFormat::ChannelsLast ? fast : fast.contiguous();
  }
#endif
  at::Tensor output = at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, input_arg.options());
  const at::Tensor input = input_arg.contiguous();
  const at::Tensor w = opmath_contiguous(weight);
  const at::Tensor b = bias_arg.defined() ? opmath_contiguous(bias_arg) : at::Tensor();
  UNET_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv2d_relu_cuda", [&] {
    if (relu) {
      launch_direct<scalar_t, true, false>(g, input_parts<scalar_t>(g, input), at::Tensor(), w, b,
                                           output_parts<scalar_t>(g, output));
    } else {
      launch_direct<scalar_t, false, false>(g, input_parts<scalar_t>(g, input), at::Tensor(), w, b,
                                            output_parts<scalar_t>(g, output));
    }
  });
  return format == at::MemoryFormat::ChannelsLast ? output.contiguous(format) : output;
}

at::Tensor conv2d_relu_cuda(const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, int64_t padding) {
  return conv2d_forward_cuda("unet_ext.conv2d_relu", input, weight, bias, padding, true);
}

at::Tensor conv2d_bias_cuda(const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, int64_t padding) {
  return conv2d_forward_cuda("unet_ext.conv2d_bias", input, weight, bias, padding, false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_backward_cuda(
    const at::Tensor& grad_out_arg, const at::Tensor& input_arg, const at::Tensor& weight,
    const std::optional<at::Tensor>& output_arg, int64_t padding, std::array<bool, 3> output_mask) {
  constexpr const char* op = "unet_ext._conv2d_backward";
  // The copies and casts below may see tensors that require grad: keep autograd out of them.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const ConvGeometry g = conv2d_geometry(op, input_arg, weight, std::nullopt, padding);
  UNET_CHECK_SAME_DEVICE(op, input_arg, grad_out_arg);
  const c10::cuda::CUDAGuard device_guard(input_arg.device());
  const std::vector<int64_t> out_shape{g.batch, g.out_channels, g.out_h, g.out_w};
  TORCH_CHECK(grad_out_arg.sizes().equals(out_shape), op, ": grad_out must have shape ",
              at::IntArrayRef(out_shape), ", got ", grad_out_arg.sizes());
  const bool masked = output_arg.has_value() && output_arg->defined();
  if (masked) {
    UNET_CHECK_SAME_DEVICE(op, input_arg, (*output_arg));
    TORCH_CHECK(output_arg->sizes().equals(out_shape), op, ": output must have shape ",
                at::IntArrayRef(out_shape), ", got ", output_arg->sizes());
  }
  const auto format = conv_memory_format(input_arg);
  at::Tensor grad_input = at::empty({0}, input_arg.options());
  at::Tensor grad_weight = at::empty({0}, weight.options());
  at::Tensor grad_bias = at::empty({0}, weight.options());
  if (!output_mask[0] && !output_mask[1] && !output_mask[2]) return {grad_input, grad_weight, grad_bias};

  bool dgrad_done = false, wgrad_done = false, bgrad_done = false;
#ifdef UNET_EXT_WITH_CUTLASS
  // Tensor-core dgrad/wgrad on the masked gradient, made once in channels_last by ReLU's own
  // backward (one pass; a select, so a masked-off NaN/inf gradient stays out, which a multiply by
  // the mask would not let it).
  if ((output_mask[0] || output_mask[1]) && conv2d_cutlass_takes(g, input_arg.scalar_type()) &&
      grad_out_arg.scalar_type() == input_arg.scalar_type()) {
    at::Tensor grad = grad_out_arg.contiguous(at::MemoryFormat::ChannelsLast);
    if (masked) grad = at::threshold_backward(grad, *output_arg, 0);
    if (output_mask[0]) {
      if (at::Tensor dx = conv2d_dgrad_cutlass(g, grad, weight); dx.defined()) {
        grad_input = format == at::MemoryFormat::ChannelsLast ? dx : dx.contiguous();
        dgrad_done = true;
      }
    }
    if (output_mask[1]) {
      if (at::Tensor dw = conv2d_wgrad_cutlass(g, grad, input_arg); dw.defined()) {
        grad_weight = dw.to(weight.scalar_type()).contiguous(weight.suggest_memory_format());
        wgrad_done = true;
      }
    }
    if (output_mask[2] && (dgrad_done || wgrad_done)) {
      // From the masked gradient already at hand, so that the generic path's NCHW copies are
      // skipped; ATen's CUDA sum reduces in a fixed order (torch lists it as deterministic).
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
  const at::Tensor output = masked ? output_arg->to(input.scalar_type()).contiguous() : at::Tensor();
  const auto acc_options = input.options().dtype(at::toOpMathType(input.scalar_type()));
  if (output_mask[0] && !dgrad_done) {
    // Every element is written by the dgrad convolution, unless grad_out is empty (C_out = 0).
    grad_input = grad_out.numel() > 0 ? at::empty(input.sizes(), input.options())
                                      : at::zeros(input.sizes(), input.options());
    if (grad_input.numel() > 0 && grad_out.numel() > 0) {
      // W'[ci, co, ky, kx] = W[co, ci, kh-1-ky, kw-1-kx]: dgrad as a forward convolution.
      const at::Tensor flipped = opmath_contiguous(weight.flip({2, 3}).transpose(0, 1));
      const ConvGeometry d = dgrad_geometry(g);
      UNET_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv2d_dgrad_cuda", [&] {
        if (masked) {
          launch_direct<scalar_t, false, true>(d, input_parts<scalar_t>(d, grad_out), output, flipped,
                                               at::Tensor(), output_parts<scalar_t>(d, grad_input));
        } else {
          launch_direct<scalar_t, false, false>(d, input_parts<scalar_t>(d, grad_out), at::Tensor(), flipped,
                                                at::Tensor(), output_parts<scalar_t>(d, grad_input));
        }
      });
    }
    if (format == at::MemoryFormat::ChannelsLast) grad_input = grad_input.contiguous(format);
  }
  if (output_mask[1] && !wgrad_done) {
    // Every element is written (a sum over zero pixels is 0), so empty() is enough.
    at::Tensor acc = at::empty(weight.sizes(), acc_options);
    UNET_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv2d_wgrad_cuda", [&] {
      if (masked) {
        launch_wgrad<scalar_t, true, false>(g, input_parts<scalar_t>(g, input), grad_out, output, acc);
      } else {
        launch_wgrad<scalar_t, false, false>(g, input_parts<scalar_t>(g, input), grad_out, output, acc);
      }
    });
    grad_weight = acc.to(weight.scalar_type()).contiguous(weight.suggest_memory_format());
  }
  if (output_mask[2] && !bgrad_done) {
    at::Tensor acc = at::empty({g.out_channels}, acc_options);
    UNET_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv2d_bgrad_cuda", [&] {
      if (masked) {
        launch_wgrad<scalar_t, true, true>(g, input_parts<scalar_t>(g, input), grad_out, output, acc);
      } else {
        launch_wgrad<scalar_t, false, true>(g, input_parts<scalar_t>(g, input), grad_out, output, acc);
      }
    });
    grad_bias = acc.to(weight.scalar_type());
  }
  return {grad_input, grad_weight, grad_bias};
}

// ---- conv2d_relu_concat ----

// crop_concat and its backward through the dispatcher (their CUDA kernels, current stream).
at::Tensor crop_concat_op(const at::Tensor& skip, const at::Tensor& up) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("unet_ext::crop_concat", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(skip, up);
}

std::tuple<at::Tensor, at::Tensor> crop_concat_backward_op(const at::Tensor& grad, int64_t channels,
                                                           int64_t height, int64_t width) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("unet_ext::_crop_concat_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, c10::SymInt, c10::SymInt, c10::SymInt)>();
  return op.call(grad, c10::SymInt(channels), c10::SymInt(height), c10::SymInt(width));
}

at::Tensor in_format(const at::Tensor& t, at::MemoryFormat format) {
  return format == at::MemoryFormat::ChannelsLast ? t.contiguous(format) : t.contiguous();
}

at::Tensor conv2d_relu_concat_cuda(const at::Tensor& skip_arg, const at::Tensor& up_arg,
                                   const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                   int64_t padding) {
  constexpr const char* op = "unet_ext.conv2d_relu_concat";
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const ConcatGeometry c = conv2d_concat_geometry(op, skip_arg, up_arg, weight, bias, padding);  // checks devices
  const c10::cuda::CUDAGuard device_guard(skip_arg.device());
  const ConvGeometry& g = c.conv;
  const auto format = conv_output_format(skip_arg, up_arg, weight);
  if (g.batch * g.out_channels * g.out_h * g.out_w == 0) {
    return at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, skip_arg.options().memory_format(format));
  }
#ifdef UNET_EXT_WITH_CUTLASS
  // The tensor-core kernels read one NHWC activation: for now the concatenation is materialised
  // (crop_concat, channels_last when both inputs are) and conv2d_relu's path runs on it. A
  // two-source CUTLASS activation iterator would remove this copy.
  if (conv2d_cutlass_fits(g, skip_arg.scalar_type())) {
    return conv2d_forward_cuda(op, crop_concat_op(skip_arg, up_arg), weight, bias, padding, true);
  }
#endif
  at::Tensor output = at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, skip_arg.options());
  const at::Tensor skip = skip_arg.contiguous(), up = up_arg.contiguous();
  const at::Tensor w = opmath_contiguous(weight);
  const at::Tensor b = bias.has_value() && bias->defined() ? opmath_contiguous(*bias) : at::Tensor();
  UNET_DISPATCH_FLOATING_TYPES(skip.scalar_type(), "conv2d_relu_concat_cuda", [&] {
    launch_direct<scalar_t, true, false>(g, c.parts(skip.const_data_ptr<scalar_t>(), up.const_data_ptr<scalar_t>()),
                                         at::Tensor(), w, b, output_parts<scalar_t>(g, output));
  });
  return format == at::MemoryFormat::ChannelsLast ? output.contiguous(format) : output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv2d_relu_concat_backward_cuda(
    const at::Tensor& grad_out_arg, const at::Tensor& skip_arg, const at::Tensor& up_arg,
    const at::Tensor& weight, const at::Tensor& output_arg, int64_t padding,
    std::array<bool, 4> output_mask) {
  constexpr const char* op = "unet_ext._conv2d_relu_concat_backward";
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const ConcatGeometry c = conv2d_concat_geometry(op, skip_arg, up_arg, weight, std::nullopt, padding);
  const ConvGeometry& g = c.conv;
  UNET_CHECK_SAME_DEVICE(op, skip_arg, grad_out_arg);
  UNET_CHECK_SAME_DEVICE(op, skip_arg, output_arg);
  const c10::cuda::CUDAGuard device_guard(skip_arg.device());
  const std::vector<int64_t> out_shape{g.batch, g.out_channels, g.out_h, g.out_w};
  TORCH_CHECK(grad_out_arg.sizes().equals(out_shape), op, ": grad_out must have shape ",
              at::IntArrayRef(out_shape), ", got ", grad_out_arg.sizes());
  TORCH_CHECK(output_arg.sizes().equals(out_shape), op, ": output must have shape ",
              at::IntArrayRef(out_shape), ", got ", output_arg.sizes());
  const auto skip_format = conv_memory_format(skip_arg), up_format = conv_memory_format(up_arg);
  at::Tensor grad_skip = at::empty({0}, skip_arg.options());
  at::Tensor grad_up = at::empty({0}, up_arg.options());
  at::Tensor grad_weight = at::empty({0}, weight.options());
  at::Tensor grad_bias = at::empty({0}, weight.options());
  const bool dgrad = output_mask[0] || output_mask[1];
  if (!dgrad && !output_mask[2] && !output_mask[3]) return {grad_skip, grad_up, grad_weight, grad_bias};
#ifdef UNET_EXT_WITH_CUTLASS
  // As the forward: tensor cores on the materialised concatenation, then its gradient split
  // into grad_skip (zero outside the crop window) and grad_up by crop_concat's backward.
  if (conv2d_cutlass_fits(g, skip_arg.scalar_type()) && g.batch * g.out_h * g.out_w > 0) {
    const at::Tensor input = crop_concat_op(skip_arg, up_arg);
    auto [gi, gw, gb] = conv2d_backward_cuda(grad_out_arg, input, weight, output_arg, padding,
                                             {dgrad, output_mask[2], output_mask[3]});
    if (dgrad) {
      auto [gs, gu] = crop_concat_backward_op(gi, c.skip_channels, c.skip_h, c.skip_w);
      if (output_mask[0]) grad_skip = in_format(gs, skip_format);
      if (output_mask[1]) grad_up = in_format(gu, up_format);
    }
    return {grad_skip, grad_up, output_mask[2] ? gw : grad_weight, output_mask[3] ? gb : grad_bias};
  }
#endif
  const at::Tensor skip = skip_arg.contiguous(), up = up_arg.contiguous();
  const at::Tensor grad_out = grad_out_arg.to(skip.scalar_type()).contiguous();
  const at::Tensor output = output_arg.to(skip.scalar_type()).contiguous();
  const auto acc_options = skip.options().dtype(at::toOpMathType(skip.scalar_type()));
  if (dgrad) {
    // dgrad writes grad_skip's crop window (zeroed around it beforehand) and grad_up.
    at::Tensor gs = at::zeros(skip.sizes(), skip.options());
    at::Tensor gu = grad_out.numel() > 0 ? at::empty(up.sizes(), up.options()) : at::zeros(up.sizes(), up.options());
    if (grad_out.numel() > 0) {
      const at::Tensor flipped = opmath_contiguous(weight.flip({2, 3}).transpose(0, 1));
      const ConvGeometry d = dgrad_geometry(g);
      UNET_DISPATCH_FLOATING_TYPES(skip.scalar_type(), "conv2d_relu_concat_dgrad_cuda", [&] {
        launch_direct<scalar_t, false, true>(d, input_parts<scalar_t>(d, grad_out), output, flipped, at::Tensor(),
                                             c.parts(gs.mutable_data_ptr<scalar_t>(), gu.mutable_data_ptr<scalar_t>()));
      });
    }
    if (output_mask[0]) grad_skip = skip_format == at::MemoryFormat::ChannelsLast ? gs.contiguous(skip_format) : gs;
    if (output_mask[1]) grad_up = up_format == at::MemoryFormat::ChannelsLast ? gu.contiguous(up_format) : gu;
  }
  const auto input = [&](auto tag) {
    using scalar_t = decltype(tag);
    return c.parts(skip.const_data_ptr<scalar_t>(), up.const_data_ptr<scalar_t>());
  };
  if (output_mask[2]) {
    at::Tensor acc = at::empty(weight.sizes(), acc_options);  // every element is written
    UNET_DISPATCH_FLOATING_TYPES(skip.scalar_type(), "conv2d_relu_concat_wgrad_cuda", [&] {
      launch_wgrad<scalar_t, true, false>(g, input(scalar_t()), grad_out, output, acc);
    });
    grad_weight = acc.to(weight.scalar_type()).contiguous(weight.suggest_memory_format());
  }
  if (output_mask[3]) {
    at::Tensor acc = at::empty({g.out_channels}, acc_options);
    UNET_DISPATCH_FLOATING_TYPES(skip.scalar_type(), "conv2d_relu_concat_bgrad_cuda", [&] {
      launch_wgrad<scalar_t, true, true>(g, input(scalar_t()), grad_out, output, acc);
    });
    grad_bias = acc.to(weight.scalar_type());
  }
  return {grad_skip, grad_up, grad_weight, grad_bias};
}

}  // namespace
}  // namespace conv
}  // namespace unet_ext

TORCH_LIBRARY_IMPL(unet_ext, CUDA, m) {
  m.impl("conv2d_relu_concat", &unet_ext::conv::conv2d_relu_concat_cuda);
  m.impl("_conv2d_relu_concat_backward", &unet_ext::conv::conv2d_relu_concat_backward_cuda);
  m.impl("conv2d_relu", &unet_ext::conv::conv2d_relu_cuda);
  m.impl("conv2d_bias", &unet_ext::conv::conv2d_bias_cuda);
  m.impl("_conv2d_backward", &unet_ext::conv::conv2d_backward_cuda);
}
