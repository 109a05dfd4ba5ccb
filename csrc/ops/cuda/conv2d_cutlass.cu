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

template <typename element_t, bool kRelu>
at::Tensor run_fprop(const ConvGeometry& g, const at::Tensor& input, const at::Tensor& weight,
                     const at::Tensor& bias) {
  using Op = typename Fprop<element_t, kRelu>::Operation;
  using Layout = cutlass::layout::TensorNHWC;
  const auto cl = at::MemoryFormat::ChannelsLast;
  const auto problem = problem_of(g);
  const at::Tensor x = packed(input, cl);    // NHWC
  const at::Tensor w = packed(weight, cl);   // KRSC
  const at::Tensor b = bias.defined() ? packed(bias, at::MemoryFormat::Contiguous)
                                      : at::zeros({g.out_channels}, input.options());
  at::Tensor output = at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, input.options().memory_format(cl));
  const typename Op::Arguments arguments{
      problem,
      {pointer<element_t>(x), Layout::packed(problem.activation_extent())},
      {pointer<element_t>(w), Layout::packed(problem.filter_extent())},
      {pointer<element_t>(b), Layout::Stride(0)},  // every output pixel reads the same bias row
      {pointer<element_t>(output), Layout::packed(problem.output_extent())},
      {1.0f}};
  return aligned16(output) && launch<Op>("unet_ext.conv2d", arguments, input.options()) ? output : at::Tensor();
}

template <typename element_t>
at::Tensor run_dgrad(const ConvGeometry& g, const at::Tensor& grad, const at::Tensor& weight) {
  using Op = typename Dgrad<element_t>::Operation;
  using Layout = cutlass::layout::TensorNHWC;
  const auto cl = at::MemoryFormat::ChannelsLast;
  const auto problem = problem_of(g);
  const at::Tensor dy = packed(grad, cl);    // NPQK
  const at::Tensor w = packed(weight, cl);   // KRSC
  at::Tensor dx = at::empty({g.batch, g.in_channels, g.in_h, g.in_w}, grad.options().memory_format(cl));
  const typename Op::Arguments arguments{
      problem,
      {pointer<element_t>(dy), Layout::packed(problem.output_extent())},
      {pointer<element_t>(w), Layout::packed(problem.filter_extent())},
      {pointer<element_t>(dx), Layout::packed(problem.activation_extent())},  // C: never read
      {pointer<element_t>(dx), Layout::packed(problem.activation_extent())},
      {1.0f}};
  return aligned16(dx) && launch<Op>("unet_ext.conv2d", arguments, grad.options()) ? dx : at::Tensor();
}

template <typename element_t>
at::Tensor run_wgrad(const ConvGeometry& g, const at::Tensor& grad, const at::Tensor& input) {
  using Op = typename Wgrad<element_t>::Operation;
  using Layout = cutlass::layout::TensorNHWC;
  const auto cl = at::MemoryFormat::ChannelsLast;
  auto problem = problem_of(g);
  problem.split_k_slices = wgrad_slices<element_t>(g.out_channels, g.in_channels * g.kernel_h * g.kernel_w,
                                                  g.batch * g.out_h * g.out_w);
  const at::Tensor dy = packed(grad, cl);   // NPQK
  const at::Tensor x = packed(input, cl);   // NHWC
  at::Tensor dw = at::empty({g.out_channels, g.in_channels, g.kernel_h, g.kernel_w},
                            grad.options().dtype(at::kFloat).memory_format(cl));  // KRSC
  float* dw_ptr = dw.mutable_data_ptr<float>();
  const typename Op::Arguments arguments{
      problem,
      {pointer<element_t>(dy), Layout::packed(problem.output_extent())},
      {pointer<element_t>(x), Layout::packed(problem.activation_extent())},
      {dw_ptr, Layout::packed(problem.filter_extent())},  // C: later slices read the running sum
      {dw_ptr, Layout::packed(problem.filter_extent())},
      {1.0f, 0.0f},
      cutlass::conv::SplitKMode::kSerial};
  return aligned16(dw) && launch<Op>("unet_ext.conv2d", arguments, grad.options()) ? dw : at::Tensor();
}

}  // namespace

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
  if (!conv2d_cutlass_fits(g, input.scalar_type())) return at::Tensor();
  // Hopper: wgmma + TMA where this build has it (16-bit floats on sm_90); else mma.sync below.
  if (at::Tensor fast = conv2d_forward_sm90(g, input, weight, bias, relu); fast.defined()) return fast;
  return dispatch_element(input.scalar_type(), [&](auto element) {
    using element_t = decltype(element);
    return relu ? run_fprop<element_t, true>(g, input, weight, bias)
                : run_fprop<element_t, false>(g, input, weight, bias);
  });
}

at::Tensor conv2d_dgrad_cutlass(const ConvGeometry& g, const at::Tensor& grad, const at::Tensor& weight) {
  if (!conv2d_cutlass_fits(g, grad.scalar_type())) return at::Tensor();
  if (at::Tensor fast = conv2d_dgrad_sm90(g, grad, weight); fast.defined()) return fast;
  return dispatch_element(grad.scalar_type(), [&](auto element) {
    return run_dgrad<decltype(element)>(g, grad, weight);
  });
}

at::Tensor conv2d_wgrad_cutlass(const ConvGeometry& g, const at::Tensor& grad, const at::Tensor& input) {
  if (!conv2d_cutlass_fits(g, grad.scalar_type())) return at::Tensor();
  if (at::Tensor fast = conv2d_wgrad_sm90(g, grad, input); fast.defined()) return fast;
  return dispatch_element(grad.scalar_type(), [&](auto element) {
    return run_wgrad<decltype(element)>(g, grad, input);
  });
}

}  // namespace conv
}  // namespace unet_ext
