// CUTLASS 2.x implicit-GEMM convolutions for conv2d_relu / conv2d_bias (kernel configurations in
// cutlass_conv.cuh): NHWC activations, KRSC filters (= channels_last weight), fp32 accumulation. fprop's
// bias is the epilogue's C operand broadcast with stride 0 (D = [relu](acc + bias), NaN kept);
// dgrad/wgrad take the masked gradient; wgrad is fp32 with serial (ordered) split-K.
// Element types: half and bfloat16, and float as TF32 (the MMA rounds float operands to tf32)
// when torch.backends.cudnn.allow_tf32 is set, as cuDNN does for stock convolutions. Twelve
// instantiations: fprop {half, bf16, float} x {ReLU, identity}, dgrad and wgrad of each.
#include "conv2d_cutlass.h"
#include "conv2d_cutlass_sm90.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "cutlass_conv.cuh"

namespace unet_ext {
namespace conv {
namespace {

using namespace cutlass_conv;  // NOLINT: the kernel configurations and host plumbing

cutlass::conv::Conv2dProblemSize problem_of(const ConvGeometry& g) {
  const int N = static_cast<int>(g.batch), H = static_cast<int>(g.in_h), W = static_cast<int>(g.in_w);
  const int C = static_cast<int>(g.in_channels), K = static_cast<int>(g.out_channels);
  const int R = static_cast<int>(g.kernel_h), S = static_cast<int>(g.kernel_w);
  const int P = static_cast<int>(g.out_h), Q = static_cast<int>(g.out_w);
  const int ph = static_cast<int>(g.pad_h), pw = static_cast<int>(g.pad_w);
  return cutlass::conv::Conv2dProblemSize({N, H, W, C}, {K, R, S, C}, {ph, ph, pw, pw}, {1, 1}, {1, 1},
                                          {N, P, Q, K}, cutlass::conv::Mode::kCrossCorrelation, 1);
}

// The runners take packed operands (NHWC / KRSC, 16-byte aligned) and write the caller's output,
// which may be a batch slice of a bigger channels_last tensor. False: CUTLASS declined.
template <typename element_t, bool kRelu>
bool run_fprop(const ConvGeometry& g, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
               const at::Tensor& output) {
  using Op = typename Fprop<element_t, kRelu>::Operation;
  using Layout = cutlass::layout::TensorNHWC;
  const auto problem = problem_of(g);
  const typename Op::Arguments arguments{
      problem,
      {pointer<element_t>(x), Layout::packed(problem.activation_extent())},
      {pointer<element_t>(w), Layout::packed(problem.filter_extent())},
      {pointer<element_t>(b), Layout::Stride(0)},  // every output pixel reads the same bias row
      {pointer<element_t>(output), Layout::packed(problem.output_extent())},
      {1.0f}};
  return launch<Op>("unet_ext.conv2d", arguments, x.options());
}

template <typename element_t>
bool run_dgrad(const ConvGeometry& g, const at::Tensor& dy, const at::Tensor& w, const at::Tensor& dx) {
  using Op = typename Dgrad<element_t>::Operation;
  using Layout = cutlass::layout::TensorNHWC;
  const auto problem = problem_of(g);
  const typename Op::Arguments arguments{
      problem,
      {pointer<element_t>(dy), Layout::packed(problem.output_extent())},
      {pointer<element_t>(w), Layout::packed(problem.filter_extent())},
      {pointer<element_t>(dx), Layout::packed(problem.activation_extent())},  // C: never read
      {pointer<element_t>(dx), Layout::packed(problem.activation_extent())},
      {1.0f}};
  return launch<Op>("unet_ext.conv2d", arguments, dy.options());
}

template <typename element_t>
bool run_wgrad(const ConvGeometry& g, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& dw) {
  using Op = typename Wgrad<element_t>::Operation;
  using Layout = cutlass::layout::TensorNHWC;
  auto problem = problem_of(g);
  problem.split_k_slices = wgrad_slices<element_t>(g.out_channels, g.in_channels * g.kernel_h * g.kernel_w,
                                                  g.batch * g.out_h * g.out_w);
  float* dw_ptr = pointer<float>(dw);
  const typename Op::Arguments arguments{
      problem,
      {pointer<element_t>(dy), Layout::packed(problem.output_extent())},
      {pointer<element_t>(x), Layout::packed(problem.activation_extent())},
      {dw_ptr, Layout::packed(problem.filter_extent())},  // C: later slices read the running sum
      {dw_ptr, Layout::packed(problem.filter_extent())},
      {1.0f, 0.0f},
      cutlass::conv::SplitKMode::kSerial};
  return launch<Op>("unet_ext.conv2d", arguments, dy.options());
}

// Images per launch for g in dtype (conv2d's activation and output are the big tensors).
int64_t conv2d_images_per_launch(const ConvGeometry& g, at::ScalarType dtype) {
  return images_per_launch(std::max(g.in_h * g.in_w * g.in_channels, g.out_h * g.out_w * g.out_channels),
                           static_cast<int64_t>(c10::elementSize(dtype)));
}

// Channel counts that are not a multiple of the tensor cores' alignment are padded with zero
// channels up to it: the first layer's 1 (grey) or 3 (RGB) input channels, the head's 2 output
// classes. A copy of a thin tensor, then tensor cores instead of the generic kernels (on the first
// H200 lease the paper's first layer took 0.48 ms there in bf16 at batch 1, cuDNN 0.15 ms, and
// the 64 -> 2 head 1.3 ms at batch 8). Zero input channels add zeros; zero output channels are
// computed and dropped.
ConvGeometry aligned_geometry(const ConvGeometry& g, at::ScalarType dtype) {
  const int alignment = channel_alignment(dtype);
  ConvGeometry padded = g;
  if (alignment > 0) {
    if (g.in_channels > 0) padded.in_channels = (g.in_channels + alignment - 1) / alignment * alignment;
    if (g.out_channels > 0) padded.out_channels = (g.out_channels + alignment - 1) / alignment * alignment;
  }
  return padded;
}

bool needs_padding(const ConvGeometry& p, const ConvGeometry& g) {
  return p.in_channels != g.in_channels || p.out_channels != g.out_channels;
}

// t (A, B, H, W) in a zero tensor (rows, columns, H, W), channels_last, at [0, A) x [0, B): an
// activation or gradient (rows = batch) or a weight (rows = C_out, columns = C_in).
at::Tensor zero_padded(const at::Tensor& t, int64_t rows, int64_t columns) {
  if (t.size(0) == rows && t.size(1) == columns) return t;
  at::Tensor out = at::zeros({rows, columns, t.size(2), t.size(3)},
                             t.options().memory_format(at::MemoryFormat::ChannelsLast));
  out.narrow(0, 0, t.size(0)).narrow(1, 0, t.size(1)).copy_(t);
  return out;
}

// t's [0, rows) x [0, channels) corner of dims 0 and 1 (zero_padded's inverse), packed channels_last.
at::Tensor unpadded(const at::Tensor& t, int64_t rows, int64_t channels) {
  if (t.size(0) == rows && t.size(1) == channels) return t;
  return t.narrow(0, 0, rows).narrow(1, 0, channels).contiguous(at::MemoryFormat::ChannelsLast);
}

}  // namespace

bool conv2d_cutlass_takes(const ConvGeometry& g, at::ScalarType dtype) {
  return conv2d_cutlass_fits(aligned_geometry(g, dtype), dtype);
}

bool conv2d_cutlass_fits(const ConvGeometry& g, at::ScalarType dtype) {
  const int alignment = channel_alignment(dtype);  // 0: dtype or GPU not taken
  if (alignment == 0 || g.in_channels % alignment != 0 || g.out_channels % alignment != 0) return false;
  // Conv2dProblemSize holds ints; can_implement then bounds every tensor below 2^31 bytes.
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  // Empty problems (C_in = 0, an empty input row range) stay with the generic kernels.
  for (int64_t v : {g.batch, g.in_h, g.in_w, g.in_channels, g.out_channels, g.kernel_h, g.kernel_w,
                    g.out_h, g.out_w}) {
    if (v <= 0 || v > kIntMax) return false;
  }
  return g.pad_h >= 0 && g.pad_h <= kIntMax && g.pad_w >= 0 && g.pad_w <= kIntMax;
}

at::Tensor conv2d_forward_cutlass(const ConvGeometry& g, const at::Tensor& input,
                                  const at::Tensor& weight, const at::Tensor& bias, bool relu) {
  if (const ConvGeometry p = aligned_geometry(g, input.scalar_type()); needs_padding(p, g)) {
    if (!conv2d_cutlass_fits(p, input.scalar_type())) return at::Tensor();
    at::Tensor b = bias;
    if (b.defined() && p.out_channels != g.out_channels) {
      b = at::zeros({p.out_channels}, bias.options());
      b.narrow(0, 0, g.out_channels).copy_(bias);
    }
    const at::Tensor out = conv2d_forward_cutlass(p, zero_padded(input, g.batch, p.in_channels),
                                                  zero_padded(weight, p.out_channels, p.in_channels), b, relu);
    return out.defined() ? unpadded(out, g.batch, g.out_channels) : out;
  }
  if (!conv2d_cutlass_fits(g, input.scalar_type())) return at::Tensor();
  const auto cl = at::MemoryFormat::ChannelsLast;
  const at::Tensor x = packed(input, cl);    // NHWC
  const at::Tensor w = packed(weight, cl);   // KRSC
  const at::Tensor b = bias.defined() ? packed(bias, at::MemoryFormat::Contiguous) : at::Tensor();
  const at::Tensor b_or_zeros = b.defined() ? b : at::zeros({g.out_channels}, input.options());
  at::Tensor output = at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, input.options().memory_format(cl));
  if (!aligned16(output)) return at::Tensor();
  const bool ran = for_each_batch_chunk(
      g, conv2d_images_per_launch(g, input.scalar_type()), [&](const ConvGeometry& chunk, int64_t first) {
        const at::Tensor xc = x.narrow(0, first, chunk.batch), yc = output.narrow(0, first, chunk.batch);
        // Hopper: wgmma + TMA where this build has it (16-bit floats on sm_90); else mma.sync.
        if (conv2d_forward_sm90(chunk, xc, w, b, relu, yc)) return true;
        return dispatch_element(input.scalar_type(), [&](auto element) {
          using element_t = decltype(element);
          return relu ? run_fprop<element_t, true>(chunk, xc, w, b_or_zeros, yc)
                      : run_fprop<element_t, false>(chunk, xc, w, b_or_zeros, yc);
        });
      });
  return ran ? output : at::Tensor();
}

at::Tensor conv2d_dgrad_cutlass(const ConvGeometry& g, const at::Tensor& grad, const at::Tensor& weight) {
  const auto cl = at::MemoryFormat::ChannelsLast;
  if (const ConvGeometry p = aligned_geometry(g, grad.scalar_type()); needs_padding(p, g)) {
    if (!conv2d_cutlass_fits(p, grad.scalar_type())) return at::Tensor();
    const at::Tensor dx = conv2d_dgrad_cutlass(p, zero_padded(grad, g.batch, p.out_channels),
                                               zero_padded(weight, p.out_channels, p.in_channels));
    return dx.defined() ? unpadded(dx, g.batch, g.in_channels) : dx;
  }
  if (!conv2d_cutlass_fits(g, grad.scalar_type())) return at::Tensor();
  const at::Tensor dy = packed(grad, cl);    // NPQK
  const at::Tensor w = packed(weight, cl);   // KRSC
  at::Tensor dx = at::empty({g.batch, g.in_channels, g.in_h, g.in_w}, grad.options().memory_format(cl));
  if (!aligned16(dx)) return at::Tensor();
  const bool ran = for_each_batch_chunk(
      g, conv2d_images_per_launch(g, grad.scalar_type()), [&](const ConvGeometry& chunk, int64_t first) {
        const at::Tensor dyc = dy.narrow(0, first, chunk.batch), dxc = dx.narrow(0, first, chunk.batch);
        if (conv2d_dgrad_sm90(chunk, dyc, w, dxc)) return true;
        return dispatch_element(grad.scalar_type(), [&](auto element) {
          return run_dgrad<decltype(element)>(chunk, dyc, w, dxc);
        });
      });
  return ran ? dx : at::Tensor();
}

at::Tensor conv2d_wgrad_cutlass(const ConvGeometry& g, const at::Tensor& grad, const at::Tensor& input) {
  const auto cl = at::MemoryFormat::ChannelsLast;
  if (const ConvGeometry p = aligned_geometry(g, grad.scalar_type()); needs_padding(p, g)) {
    if (!conv2d_cutlass_fits(p, grad.scalar_type())) return at::Tensor();
    const at::Tensor dw = conv2d_wgrad_cutlass(p, zero_padded(grad, g.batch, p.out_channels),
                                               zero_padded(input, g.batch, p.in_channels));
    return dw.defined() ? unpadded(dw, g.out_channels, g.in_channels) : dw;
  }
  if (!conv2d_cutlass_fits(g, grad.scalar_type())) return at::Tensor();
  const at::Tensor dy = packed(grad, cl);   // NPQK
  const at::Tensor x = packed(input, cl);   // NHWC
  const auto dw_options = grad.options().dtype(at::kFloat).memory_format(cl);  // KRSC
  const std::vector<int64_t> dw_shape{g.out_channels, g.in_channels, g.kernel_h, g.kernel_w};
  at::Tensor dw = at::empty(dw_shape, dw_options);
  // A big batch: one dW per launch, summed in chunk order (fp32, deterministic).
  at::Tensor partial;
  const bool ran = for_each_batch_chunk(
      g, conv2d_images_per_launch(g, grad.scalar_type()), [&](const ConvGeometry& chunk, int64_t first) {
        const at::Tensor dyc = dy.narrow(0, first, chunk.batch), xc = x.narrow(0, first, chunk.batch);
        at::Tensor target = dw;
        if (first > 0) {
          if (!partial.defined()) partial = at::empty(dw_shape, dw_options);
          target = partial;
        }
        if (!aligned16(target)) return false;
        const bool chunk_ran = conv2d_wgrad_sm90(chunk, dyc, xc, target) ||
                               dispatch_element(grad.scalar_type(), [&](auto element) {
                                 return run_wgrad<decltype(element)>(chunk, dyc, xc, target);
                               });
        if (chunk_ran && first > 0) dw.add_(partial);
        return chunk_ran;
      });
  return ran ? dw : at::Tensor();
}

}  // namespace conv
}  // namespace unet_ext
