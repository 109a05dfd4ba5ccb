// conv_transpose2x2 on tensor cores with CUTLASS (kernel configurations in cutlass_conv.cuh).
// The 2x2 stride-2 up-conv is a convolution in disguise: read the channels_last output
// [N, 2H, 2W, C_out] as [N, 2H, W, 2 C_out] (the two horizontal neighbours (dx, co) of a pair
// become one pixel's channels). Then, with the filter F[ci][dy][0][dx * C_out + co] =
// W[ci][co][dy][dx] (KRSC, K = C_in, R = 2, S = 1, C = 2 C_out) and stride (2, 1):
//   up-conv forward = the dgrad of that convolution (CUTLASS strided dgrad; the bias is the
//                     epilogue's broadcast C row), writing the output once, in place;
//   up-conv dgrad   = its fprop on grad_out (read the same way);
//   up-conv wgrad   = its wgrad (serial split-K: a fixed summation order), then permuted.
// No scatter pass and no activation-sized temporary: the reinterpretations are free.
#include "conv_transpose2x2_cutlass.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "cutlass_conv.cuh"

namespace unet_ext {
namespace conv {
namespace {

using namespace cutlass_conv;  // NOLINT: the kernel configurations and host plumbing

constexpr const char* kOp = "unet_ext.conv_transpose2x2";

bool fits(const ConvGeometry& g, at::ScalarType dtype) {
  const int alignment = channel_alignment(dtype);  // 0: dtype or GPU not taken
  if (alignment == 0 || g.in_channels % alignment != 0 || g.out_channels % alignment != 0) return false;
  // Conv2dProblemSize holds ints; empty problems stay with the generic kernels.
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  for (int64_t v : {g.batch, g.in_channels, 2 * g.out_channels, g.out_h, g.in_w}) {
    if (v <= 0 || v > kIntMax) return false;
  }
  return true;
}

// The disguised convolution: activation [N, 2H, W, 2 C_out] -> output [N, H, W, C_in].
cutlass::conv::Conv2dProblemSize problem_of(const ConvGeometry& g) {
  const int N = static_cast<int>(g.batch), H = static_cast<int>(g.in_h), W = static_cast<int>(g.in_w);
  const int K = static_cast<int>(g.in_channels), C = static_cast<int>(2 * g.out_channels);
  return cutlass::conv::Conv2dProblemSize({N, 2 * H, W, C}, {K, 2, 1, C}, {0, 0, 0, 0}, {2, 1}, {1, 1},
                                          {N, H, W, K}, cutlass::conv::Mode::kCrossCorrelation, 1);
}

// F (KRSC [C_in][2][1][2 C_out]) = W (C_in, C_out, 2, 2) permuted to (C_in, dy, dx, C_out).
at::Tensor filter_of(const at::Tensor& weight, at::ScalarType dtype) {
  at::Tensor f = weight.to(dtype).permute({0, 2, 3, 1}).contiguous();
  return aligned16(f) ? f : f.clone();
}

// The runners take packed operands (16-byte aligned) and write the caller's output, which may be
// a batch slice of a bigger channels_last tensor. False: CUTLASS declined.
template <typename element_t>
bool run_forward(const ConvGeometry& g, const at::Tensor& x, const at::Tensor& f, const at::Tensor& b,
                 const at::Tensor& output) {
  using Op = typename Dgrad<element_t, cutlass::conv::StrideSupport::kStrided, true>::Operation;
  using Layout = cutlass::layout::TensorNHWC;
  const auto problem = problem_of(g);
  const typename Op::Arguments arguments{
      problem,
      {pointer<element_t>(x), Layout::packed(problem.output_extent())},
      {pointer<element_t>(f), Layout::packed(problem.filter_extent())},
      {pointer<element_t>(b), Layout::Stride(0)},  // every output pixel reads the same bias row
      {pointer<element_t>(output), Layout::packed(problem.activation_extent())},
      {1.0f}};
  return launch<Op>(kOp, arguments, x.options());
}

template <typename element_t>
bool run_dgrad(const ConvGeometry& g, const at::Tensor& dy, const at::Tensor& f, const at::Tensor& zero,
               const at::Tensor& dx) {
  using Op = typename Fprop<element_t, false>::Operation;
  using Layout = cutlass::layout::TensorNHWC;
  const auto problem = problem_of(g);
  const typename Op::Arguments arguments{
      problem,
      {pointer<element_t>(dy), Layout::packed(problem.activation_extent())},
      {pointer<element_t>(f), Layout::packed(problem.filter_extent())},
      {pointer<element_t>(zero), Layout::Stride(0)},
      {pointer<element_t>(dx), Layout::packed(problem.output_extent())},
      {1.0f}};
  return launch<Op>(kOp, arguments, dy.options());
}

template <typename element_t>
bool run_wgrad(const ConvGeometry& g, const at::Tensor& x, const at::Tensor& dy, const at::Tensor& df) {
  using Op = typename Wgrad<element_t>::Operation;
  using Layout = cutlass::layout::TensorNHWC;
  auto problem = problem_of(g);
  problem.split_k_slices = wgrad_slices<element_t>(g.in_channels, 4 * g.out_channels, g.batch * g.in_h * g.in_w);
  float* df_ptr = pointer<float>(df);
  const typename Op::Arguments arguments{
      problem,
      {pointer<element_t>(x), Layout::packed(problem.output_extent())},
      {pointer<element_t>(dy), Layout::packed(problem.activation_extent())},
      {df_ptr, Layout::packed(problem.filter_extent())},  // C: later slices read the running sum
      {df_ptr, Layout::packed(problem.filter_extent())},
      {1.0f, 0.0f},
      cutlass::conv::SplitKMode::kSerial};
  return launch<Op>(kOp, arguments, dy.options());
}

// Images per launch: the up-conv's output (4 H W C_out per image) and input (H W C_in) are the big tensors.
int64_t up_images_per_launch(const ConvGeometry& g, at::ScalarType dtype) {
  return images_per_launch(std::max(4 * g.in_h * g.in_w * g.out_channels, g.in_h * g.in_w * g.in_channels),
                           static_cast<int64_t>(c10::elementSize(dtype)));
}

}  // namespace

at::Tensor conv_transpose2x2_forward_cutlass(const ConvGeometry& g, const at::Tensor& input,
                                             const at::Tensor& weight, const at::Tensor& bias) {
  if (!fits(g, input.scalar_type())) return at::Tensor();
  const at::Tensor x = packed(input, at::MemoryFormat::ChannelsLast);  // the dgrad's "dy": NHWC, C_in
  const at::Tensor f = filter_of(weight, input.scalar_type());
  // One bias per (dx, co) channel of the disguised output: the bias twice.
  const at::Tensor b = bias.defined() ? bias.to(input.scalar_type()).repeat({2})
                                      : at::zeros({2 * g.out_channels}, input.options());
  at::Tensor output = at::empty({g.batch, g.out_channels, g.out_h, g.out_w},
                                input.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (!aligned16(output) || !aligned16(b)) return at::Tensor();
  const bool ran = for_each_batch_chunk(
      g, up_images_per_launch(g, input.scalar_type()), [&](const ConvGeometry& chunk, int64_t first) {
        return dispatch_element(input.scalar_type(), [&](auto element) {
          return run_forward<decltype(element)>(chunk, x.narrow(0, first, chunk.batch), f, b,
                                                output.narrow(0, first, chunk.batch));
        });
      });
  return ran ? output : at::Tensor();
}

at::Tensor conv_transpose2x2_dgrad_cutlass(const ConvGeometry& g, const at::Tensor& grad_out,
                                           const at::Tensor& weight) {
  if (!fits(g, grad_out.scalar_type())) return at::Tensor();
  const at::Tensor dy = packed(grad_out, at::MemoryFormat::ChannelsLast);  // read as [N, 2H, W, 2 C_out]
  const at::Tensor f = filter_of(weight, grad_out.scalar_type());
  const at::Tensor zero = at::zeros({g.in_channels}, grad_out.options());  // the fprop's C row
  at::Tensor dx = at::empty({g.batch, g.in_channels, g.in_h, g.in_w},
                            grad_out.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (!aligned16(dx) || !aligned16(zero)) return at::Tensor();
  const bool ran = for_each_batch_chunk(
      g, up_images_per_launch(g, grad_out.scalar_type()), [&](const ConvGeometry& chunk, int64_t first) {
        return dispatch_element(grad_out.scalar_type(), [&](auto element) {
          return run_dgrad<decltype(element)>(chunk, dy.narrow(0, first, chunk.batch), f, zero,
                                              dx.narrow(0, first, chunk.batch));
        });
      });
  return ran ? dx : at::Tensor();
}

at::Tensor conv_transpose2x2_wgrad_cutlass(const ConvGeometry& g, const at::Tensor& grad_out,
                                           const at::Tensor& input, at::ScalarType weight_dtype) {
  if (!fits(g, grad_out.scalar_type())) return at::Tensor();
  const at::Tensor x = packed(input, at::MemoryFormat::ChannelsLast);      // the wgrad's "dy": NPQK
  const at::Tensor dy = packed(grad_out, at::MemoryFormat::ChannelsLast);  // its activation
  const std::vector<int64_t> df_shape{g.in_channels, 2, 1, 2 * g.out_channels};
  const auto df_options = grad_out.options().dtype(at::kFloat);
  at::Tensor df = at::empty(df_shape, df_options);
  at::Tensor partial;  // a big batch: one filter gradient per launch, summed in chunk order
  const bool ran = for_each_batch_chunk(
      g, up_images_per_launch(g, grad_out.scalar_type()), [&](const ConvGeometry& chunk, int64_t first) {
        at::Tensor target = df;
        if (first > 0) {
          if (!partial.defined()) partial = at::empty(df_shape, df_options);
          target = partial;
        }
        const bool chunk_ran = aligned16(target) && dispatch_element(grad_out.scalar_type(), [&](auto element) {
          return run_wgrad<decltype(element)>(chunk, x.narrow(0, first, chunk.batch),
                                              dy.narrow(0, first, chunk.batch), target);
        });
        if (chunk_ran && first > 0) df.add_(partial);
        return chunk_ran;
      });
  if (!ran) return at::Tensor();
  // [ci][dy][0][(dx, co)] -> (C_in, C_out, 2, 2)
  return df.view({g.in_channels, 2, 2, g.out_channels}).permute({0, 3, 1, 2}).to(weight_dtype).contiguous();
}

}  // namespace conv
}  // namespace unet_ext
