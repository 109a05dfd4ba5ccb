// CUTLASS 2.x implicit-GEMM convolutions for conv2d_relu / conv2d_bias (sm_80 mma.sync, which sm_90
// runs too): NHWC activations, KRSC filters (= channels_last weight), fp32 accumulation. fprop's
// bias is the epilogue's C operand broadcast with stride 0 (D = [relu](acc + bias), NaN kept);
// dgrad/wgrad take the masked gradient; wgrad is fp32 with serial (ordered) split-K.
// Element types: half and bfloat16, and float as TF32 (the MMA rounds float operands to tf32)
// when torch.backends.cudnn.allow_tf32 is set, as cuDNN does for stock convolutions. Twelve
// instantiations: fprop {half, bf16, float} x {ReLU, identity}, dgrad and wgrad of each.
#include "conv2d_cutlass.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "cutlass/bfloat16.h"
// The kernel header first: the device header uses helpers it brings in.
#include "cutlass/conv/kernel/default_conv2d_dgrad.h"
#include "cutlass/conv/kernel/default_conv2d_fprop.h"
#include "cutlass/conv/kernel/default_conv2d_wgrad.h"
#include "cutlass/conv/device/implicit_gemm_convolution.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/epilogue/thread/linear_combination_relu.h"
#include "cutlass/half.h"

namespace unet_ext {
namespace conv {
namespace {

// 128-bit accesses: 8 half/bfloat16 or 4 float elements, so C_in and C_out must be multiples of that.
template <typename element_t>
constexpr int kAlignment = 128 / cutlass::sizeof_bits<element_t>::value;

// Tiles. 16-bit: 128x128x32 blocks of 4 warps of 64x64, 3 stages (48 KiB of shared memory), the
// standard Ampere f16 configuration, whose 64x64 fp32 warp accumulators fit without spills.
// TF32: 128x64x16 blocks of 4 warps of 64x32 and the 16x8x8 MMA, 3 stages (36 KiB): float
// operands take twice the registers, and this is CUTLASS's own TF32 conv configuration.
template <typename element_t>
struct Tiles {
  using Block = cutlass::gemm::GemmShape<128, 128, 32>;
  using Warp = cutlass::gemm::GemmShape<64, 64, 32>;
  using Instruction = cutlass::gemm::GemmShape<16, 8, 16>;
};
template <>
struct Tiles<float> {
  using Block = cutlass::gemm::GemmShape<128, 64, 16>;
  using Warp = cutlass::gemm::GemmShape<64, 32, 16>;
  using Instruction = cutlass::gemm::GemmShape<16, 8, 8>;
};

template <typename element_t, bool kRelu>
struct Fprop {
  using Layout = cutlass::layout::TensorNHWC;
  // alpha * acc + C with C = the bias row (NoBetaScaling: no beta multiply on the bias).
  using EpilogueRelu = cutlass::epilogue::thread::LinearCombinationRelu<
      element_t, kAlignment<element_t>, float, float, cutlass::epilogue::thread::ScaleType::NoBetaScaling>;
  using EpilogueIdentity = cutlass::epilogue::thread::LinearCombination<
      element_t, kAlignment<element_t>, float, float, cutlass::epilogue::thread::ScaleType::NoBetaScaling>;
  using Epilogue = std::conditional_t<kRelu, EpilogueRelu, EpilogueIdentity>;
  using T = Tiles<element_t>;
  using Kernel = typename cutlass::conv::kernel::DefaultConv2dFprop<
      element_t, Layout, element_t, Layout, element_t, Layout, float,
      cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
      typename T::Block, typename T::Warp, typename T::Instruction, Epilogue,
      cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, 3,
      cutlass::arch::OpMultiplyAdd, cutlass::conv::IteratorAlgorithm::kOptimized>::Kernel;
  using Operation = cutlass::conv::device::ImplicitGemmConvolution<Kernel>;
};

// dgrad: dx = conv(dy, W) in the transposed sense, A = dy (NPQK), B = W (KRSC), D = dx (NHWC).
// Unit stride, so the unity-stride optimized iterators; the epilogue only converts (no C read).
template <typename element_t>
struct Dgrad {
  using Layout = cutlass::layout::TensorNHWC;
  using Epilogue = cutlass::epilogue::thread::LinearCombination<
      element_t, kAlignment<element_t>, float, float, cutlass::epilogue::thread::ScaleType::Nothing>;
  using T = Tiles<element_t>;
  using Kernel = typename cutlass::conv::kernel::DefaultConv2dDgrad<
      element_t, Layout, element_t, Layout, element_t, Layout, float,
      cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
      typename T::Block, typename T::Warp, typename T::Instruction, Epilogue,
      cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, 3,
      cutlass::arch::OpMultiplyAdd, cutlass::conv::IteratorAlgorithm::kOptimized,
      cutlass::conv::StrideSupport::kUnity>::Kernel;
  using Operation = cutlass::conv::device::ImplicitGemmConvolution<Kernel>;
};

// wgrad: dW (KRSC, fp32) = dy^T x over the N*P*Q pixels, A = dy (NPQK), B = x (NHWC). The long
// reduction is split over k-slices with *serial* split-K: slices add into D one after another
// in slice order (a semaphore per tile), so the sum's order is fixed: deterministic, no atomics.
// Default scaling (beta = 0 for slice 0, CUTLASS sets beta = 1 for later slices).
template <typename element_t>
struct Wgrad {
  using Layout = cutlass::layout::TensorNHWC;
  using Epilogue = cutlass::epilogue::thread::LinearCombination<float, 4, float, float>;
  using T = Tiles<element_t>;
  using Kernel = typename cutlass::conv::kernel::DefaultConv2dWgrad<
      element_t, Layout, element_t, Layout, float, Layout, float,
      cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
      typename T::Block, typename T::Warp, typename T::Instruction, Epilogue,
      cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, 3,
      cutlass::arch::OpMultiplyAdd, cutlass::conv::IteratorAlgorithm::kOptimized>::Kernel;
  using Operation = cutlass::conv::device::ImplicitGemmConvolution<Kernel>;
};

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0; }

// t in `format`, densely packed, at a 16-byte aligned address (a view may start anywhere).
at::Tensor packed(const at::Tensor& t, at::MemoryFormat format) {
  at::Tensor c = t.contiguous(format);
  return aligned16(c) ? c : c.clone(format);
}

cutlass::conv::Conv2dProblemSize problem_of(const ConvGeometry& g) {
  const int N = static_cast<int>(g.batch), H = static_cast<int>(g.in_h), W = static_cast<int>(g.in_w);
  const int C = static_cast<int>(g.in_channels), K = static_cast<int>(g.out_channels);
  const int R = static_cast<int>(g.kernel_h), S = static_cast<int>(g.kernel_w);
  const int P = static_cast<int>(g.out_h), Q = static_cast<int>(g.out_w);
  const int ph = static_cast<int>(g.pad_h), pw = static_cast<int>(g.pad_w);
  return cutlass::conv::Conv2dProblemSize({N, H, W, C}, {K, R, S, C}, {ph, ph, pw, pw}, {1, 1}, {1, 1},
                                          {N, P, Q, K}, cutlass::conv::Mode::kCrossCorrelation, 1);
}

template <typename element_t>
element_t* pointer(const at::Tensor& t) {
  return reinterpret_cast<element_t*>(const_cast<void*>(t.const_data_ptr()));
}

// Returns false when CUTLASS cannot run the problem (then nothing was launched). The workspace
// (serial split-K semaphores; none otherwise) comes from the caching allocator and is zeroed
// by initialize() on the current stream.
template <typename Op>
bool launch(const typename Op::Arguments& arguments, const at::TensorOptions& options) {
  if (Op::can_implement(arguments) != cutlass::Status::kSuccess) return false;
  const size_t workspace_bytes = Op::get_workspace_size(arguments);
  at::Tensor workspace;
  if (workspace_bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(workspace_bytes)}, options.dtype(at::kByte));
  }
  Op op;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  TORCH_CHECK(op.initialize(arguments, workspace_bytes > 0 ? workspace.mutable_data_ptr() : nullptr, stream) ==
                  cutlass::Status::kSuccess,
              "unet_ext.conv2d: CUTLASS initialisation failed");
  const cutlass::Status status = op.run(stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  TORCH_CHECK(status == cutlass::Status::kSuccess, "unet_ext.conv2d: CUTLASS launch failed");
  return true;
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
  return aligned16(output) && launch<Op>(arguments, input.options()) ? output : at::Tensor();
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
  return aligned16(dx) && launch<Op>(arguments, grad.options()) ? dx : at::Tensor();
}

// k-slices of the wgrad reduction: about 256 tiles in all (two waves on 132 SMs), each slice at
// least 64 main-loop iterations (32 pixels each; 16 for TF32). Depends on the shapes only, not on the GPU, so
// the summation order (and the result) is the same everywhere.
template <typename element_t>
int wgrad_slices(const ConvGeometry& g) {
  using Block = typename Tiles<element_t>::Block;
  const int64_t tiles = ((g.out_channels + Block::kM - 1) / Block::kM) *
                        ((g.in_channels * g.kernel_h * g.kernel_w + Block::kN - 1) / Block::kN);
  const int64_t iterations = (g.batch * g.out_h * g.out_w + Block::kK - 1) / Block::kK;
  const int64_t by_tiles = (256 + tiles - 1) / tiles;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(by_tiles, iterations / 64)));
}

template <typename element_t>
at::Tensor run_wgrad(const ConvGeometry& g, const at::Tensor& grad, const at::Tensor& input) {
  using Op = typename Wgrad<element_t>::Operation;
  using Layout = cutlass::layout::TensorNHWC;
  const auto cl = at::MemoryFormat::ChannelsLast;
  auto problem = problem_of(g);
  problem.split_k_slices = wgrad_slices<element_t>(g);
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
  return aligned16(dw) && launch<Op>(arguments, grad.options()) ? dw : at::Tensor();
}

// f(element_t{}) with the CUTLASS element type of a (fitting) dtype.
template <typename F>
at::Tensor dispatch_element(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kHalf: return f(cutlass::half_t{});
    case at::kBFloat16: return f(cutlass::bfloat16_t{});
    default: return f(float{});
  }
}

}  // namespace

bool conv2d_cutlass_fits(const ConvGeometry& g, at::ScalarType dtype) {
  int alignment = 0;
  if (dtype == at::kHalf || dtype == at::kBFloat16) {
    alignment = kAlignment<cutlass::half_t>;
  } else if (dtype == at::kFloat && at::globalContext().allowTF32CuDNN()) {
    alignment = kAlignment<float>;  // TF32 only where stock convolutions would use it too
  } else {
    return false;
  }
  if (g.in_channels % alignment != 0 || g.out_channels % alignment != 0) return false;
  // Conv2dProblemSize holds ints; can_implement then bounds every tensor below 2^31 bytes.
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  // Empty problems (C_in = 0, an empty input row range) stay with the generic kernels.
  for (int64_t v : {g.batch, g.in_h, g.in_w, g.in_channels, g.out_channels, g.kernel_h, g.kernel_w,
                    g.out_h, g.out_w}) {
    if (v <= 0 || v > kIntMax) return false;
  }
  if (g.pad_h < 0 || g.pad_h > kIntMax || g.pad_w < 0 || g.pad_w > kIntMax) return false;
  // sm_80 kernels: older GPUs take the generic path.
  return at::cuda::getCurrentDeviceProperties()->major >= 8;
}

at::Tensor conv2d_forward_cutlass(const ConvGeometry& g, const at::Tensor& input,
                                  const at::Tensor& weight, const at::Tensor& bias, bool relu) {
  if (!conv2d_cutlass_fits(g, input.scalar_type())) return at::Tensor();
  return dispatch_element(input.scalar_type(), [&](auto element) {
    using element_t = decltype(element);
    return relu ? run_fprop<element_t, true>(g, input, weight, bias)
                : run_fprop<element_t, false>(g, input, weight, bias);
  });
}

at::Tensor conv2d_dgrad_cutlass(const ConvGeometry& g, const at::Tensor& grad, const at::Tensor& weight) {
  if (!conv2d_cutlass_fits(g, grad.scalar_type())) return at::Tensor();
  return dispatch_element(grad.scalar_type(), [&](auto element) {
    return run_dgrad<decltype(element)>(g, grad, weight);
  });
}

at::Tensor conv2d_wgrad_cutlass(const ConvGeometry& g, const at::Tensor& grad, const at::Tensor& input) {
  if (!conv2d_cutlass_fits(g, grad.scalar_type())) return at::Tensor();
  return dispatch_element(grad.scalar_type(), [&](auto element) {
    return run_wgrad<decltype(element)>(g, grad, input);
  });
}

}  // namespace conv
}  // namespace unet_ext
