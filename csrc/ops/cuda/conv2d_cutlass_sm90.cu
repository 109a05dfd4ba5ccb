// Hopper path of conv2d_relu / conv2d_bias: fprop, dgrad and wgrad for float16/bfloat16: CUTLASS 3.x
// implicit GEMM with TMA im2col loads into shared memory and warpgroup MMA (wgmma), warp-
// specialised (a producer warpgroup issues TMA, a consumer warpgroup runs wgmma and the epilogue).
// fprop's epilogue is D = [relu](acc + bias[k]) (the fusion's per-column bias: GEMM N = C_out).
// Only sm_90a runs wgmma, so the kernels have bodies only when the build's arch list names 9.0a
// (setup.py then defines UNET_EXT_SM90A); elsewhere these entry points return an undefined tensor
// and conv2d_cutlass.cu's sm_80 kernels serve. wgrad (fp32 dW) runs here only where its GEMM has
// enough output tiles to fill the GPU: CUTLASS's sm_90 conv has no split-K, and the shallow
// layers' long pixel reduction over a few tiles needs one (the sm_80 kernel's serial split-K).
#include "conv2d_cutlass_sm90.h"

#include <ATen/cuda/CUDAContext.h>

#if defined(UNET_EXT_WITH_CUTLASS) && defined(UNET_EXT_SM90A)

#include <cstdint>

#include "cute/tensor.hpp"
#include "cutlass/kernel_hardware_info.hpp"  // before the collectives, which use it
#include "cutlass/bfloat16.h"
#include "cutlass/conv/collective/collective_builder.hpp"
#include "cutlass/conv/convnd_problem_shape.hpp"
#include "cutlass/conv/device/conv_universal_adapter.hpp"
#include "cutlass/conv/dispatch_policy.hpp"
#include "cutlass/conv/kernel/conv_universal.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/thread/activation.h"
#include "cutlass/half.h"
#include "cutlass_conv.cuh"

namespace unet_ext {
namespace conv {
namespace {

using cutlass_conv::aligned16;
using cutlass_conv::launch;  // CUTLASS 3's ConvUniversalAdapter has the 2.x device interface
using cutlass_conv::packed;
using cutlass_conv::pointer;

// 128x128 output tiles with a 64-deep K step: 32 KiB of A+B per stage, so the builder fits about
// six stages beside the epilogue's buffers in the 227 KiB of shared memory. One CTA per cluster.
using TileShape = cute::Shape<cute::_128, cute::_128, cute::Shape<cute::_64>>;
using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
using Layout = cutlass::layout::TensorNHWC;

template <typename element_t>
constexpr int kAlignment = 128 / cutlass::sizeof_bits<element_t>::value;

// Mainloop + epilogue + kernel for one convolution operator and epilogue fusion. The epilogue
// reads no C operand (ElementC = void): fprop adds the bias through the fusion.
template <cutlass::conv::Operator kOp, typename element_t, typename Fusion, typename output_t = element_t,
          typename Tile = TileShape, typename OutputLayout = Layout,
          typename EpilogueSchedule = cutlass::epilogue::TmaWarpSpecialized>
struct Sm90Conv {
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, OutputLayout, kAlignment<output_t>, output_t, OutputLayout, kAlignment<output_t>,
      EpilogueSchedule, Fusion>::CollectiveOp;
  using Mainloop = typename cutlass::conv::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, kOp,
      element_t, Layout, kAlignment<element_t>, element_t, Layout, kAlignment<element_t>, float,
      Tile, ClusterShape,
      cutlass::conv::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::conv::collective::KernelScheduleAuto>::CollectiveOp;
  using Problem = cutlass::conv::ConvProblemShape<kOp, Mainloop::DispatchPolicy::NumSpatialDimensions>;
  using Kernel = cutlass::conv::kernel::ConvUniversal<Problem, Mainloop, Epilogue>;
  using Operation = cutlass::conv::device::ConvUniversalAdapter<Kernel>;
};

template <bool kRelu>
struct Activation {
  template <typename T>
  using Fn = cutlass::epilogue::thread::ReLu<T>;  // NaN-propagating, as torch.relu
};
template <>
struct Activation<false> {
  template <typename T>
  using Fn = cutlass::epilogue::thread::Identity<T>;
};

template <typename element_t, bool kRelu>
using FpropConv = Sm90Conv<
    cutlass::conv::Operator::kFprop, element_t,
    cutlass::epilogue::fusion::LinCombPerColBiasEltAct<Activation<kRelu>::template Fn, element_t, float,
                                                       element_t, element_t>>;

template <typename element_t>
using DgradConv = Sm90Conv<cutlass::conv::Operator::kDgrad, element_t,
                           cutlass::epilogue::fusion::LinearCombination<element_t, float, void>>;

// wgrad: dW (fp32, KRSC in memory) = dy^T x over all N*P*Q pixels, one CTA per output tile (no
// split-K). GEMM N is the filter's (C, S, R) modes, tiled 128 channels at a time; CUTLASS's wgrad
// epilogue takes the KCSR layout tag for them and writes registers straight to memory.
template <typename element_t>
using WgradConv = Sm90Conv<cutlass::conv::Operator::kWgrad, element_t,
                           cutlass::epilogue::fusion::LinearCombination<float, float, void>, float,
                           cute::Shape<cute::_128, cute::Shape<cute::_128>, cute::Shape<cute::_64>>,
                           cutlass::layout::TensorKCSR, cutlass::epilogue::NoSmemWarpSpecialized>;

// The problem in CUTLASS 3's terms: NHWC activation, KRSC filter, both packed; unit stride.
template <typename Problem>
Problem problem_of(const ConvGeometry& g) {
  const int ph = static_cast<int>(g.pad_h), pw = static_cast<int>(g.pad_w);
  return Problem(cutlass::conv::Mode::kCrossCorrelation,
                 {static_cast<int>(g.batch), static_cast<int>(g.in_h), static_cast<int>(g.in_w),
                  static_cast<int>(g.in_channels)},
                 {static_cast<int>(g.out_channels), static_cast<int>(g.kernel_h), static_cast<int>(g.kernel_w),
                  static_cast<int>(g.in_channels)},
                 {ph, pw}, {ph, pw}, {1, 1}, {1, 1}, 1);
}

// The epilogue's stride of D, packed: fprop/dgrad write NHWC, the GEMM's M mode being the pixel
// modes (Q, P, N), whose strides are shape_C's in reverse order, and N the unit-stride channels;
// wgrad writes the filter, K rows of (C, S, R).
template <typename Conv, typename Problem>
typename Conv::Kernel::StrideD stride_d_of(const Problem& problem) {
  using StrideD = typename Conv::Kernel::StrideD;
  if constexpr (Problem::ConvOp == cutlass::conv::Operator::kWgrad) {
    return cutlass::make_cute_packed_stride(StrideD{}, problem.shape_C, problem.stride_C, Problem::ConvOp);
  } else {
    StrideD stride{};
    cute::for_each(cute::make_seq<cute::rank<0>(StrideD{})>{}, [&](auto i) {
      cute::get<0, i>(stride) = problem.stride_C[Problem::RankT - 2 - i];
    });
    return stride;
  }
}

// Runs Conv on the packed operands a, b into d (D = alpha * acc with alpha 1; no C operand);
// set_fusion fills the epilogue fusion's other arguments (fprop's bias). d must be 16-byte
// aligned. False when CUTLASS cannot take the problem (nothing launched).
template <typename Conv, typename element_t, typename output_t, typename SetFusion>
bool run_conv(const ConvGeometry& g, const element_t* a, const element_t* b, output_t* d,
              const at::TensorOptions& options, SetFusion&& set_fusion) {
  using Op = typename Conv::Operation;
  const auto problem = problem_of<typename Conv::Problem>(g);
  const auto stride_d = stride_d_of<Conv>(problem);
  typename Op::Arguments arguments{problem, {a, b}, {{}, nullptr, stride_d, d, stride_d}};
  arguments.epilogue.thread.alpha = 1.0f;
  arguments.epilogue.thread.beta = 0.0f;
  set_fusion(arguments.epilogue.thread);
  return launch<Op>("unet_ext.conv2d (sm_90)", arguments, options);
}

constexpr auto kNoFusionArguments = [](auto&) {};

template <typename element_t, bool kRelu>
at::Tensor run_fprop(const ConvGeometry& g, const at::Tensor& input, const at::Tensor& weight,
                     const at::Tensor& bias) {
  const auto cl = at::MemoryFormat::ChannelsLast;
  const at::Tensor x = packed(input, cl);    // NHWC
  const at::Tensor w = packed(weight, cl);   // KRSC
  const at::Tensor b = bias.defined() ? packed(bias, at::MemoryFormat::Contiguous) : at::Tensor();
  at::Tensor output = at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, input.options().memory_format(cl));
  const bool ran = aligned16(output) &&
                   run_conv<FpropConv<element_t, kRelu>>(
                       g, pointer<element_t>(x), pointer<element_t>(w), pointer<element_t>(output), input.options(),
                       [&](auto& fusion) { fusion.bias_ptr = b.defined() ? pointer<element_t>(b) : nullptr; });
  return ran ? output : at::Tensor();  // a null bias reads as zeros
}

template <typename element_t>
at::Tensor run_dgrad(const ConvGeometry& g, const at::Tensor& grad, const at::Tensor& weight) {
  const auto cl = at::MemoryFormat::ChannelsLast;
  const at::Tensor dy = packed(grad, cl);    // NPQK
  const at::Tensor w = packed(weight, cl);   // KRSC
  at::Tensor dx = at::empty({g.batch, g.in_channels, g.in_h, g.in_w}, grad.options().memory_format(cl));
  const bool ran = aligned16(dx) && run_conv<DgradConv<element_t>>(g, pointer<element_t>(dy), pointer<element_t>(w),
                                                                   pointer<element_t>(dx), grad.options(),
                                                                   kNoFusionArguments);
  return ran ? dx : at::Tensor();
}

template <typename element_t>
at::Tensor run_wgrad(const ConvGeometry& g, const at::Tensor& grad, const at::Tensor& input) {
  const auto cl = at::MemoryFormat::ChannelsLast;
  const at::Tensor dy = packed(grad, cl);   // NPQK
  const at::Tensor x = packed(input, cl);   // NHWC
  at::Tensor dw = at::empty({g.out_channels, g.in_channels, g.kernel_h, g.kernel_w},
                            grad.options().dtype(at::kFloat).memory_format(cl));  // KRSC
  const bool ran = aligned16(dw) && run_conv<WgradConv<element_t>>(g, pointer<element_t>(dy), pointer<element_t>(x),
                                                                   dw.mutable_data_ptr<float>(), grad.options(),
                                                                   kNoFusionArguments);
  return ran ? dw : at::Tensor();
}

// Only 16-bit float, on an sm_90 device (the sm_90a kernels run nowhere else), and padding up to
// k - 1 (U-Net's 0 and k / 2; larger padding gives dgrad a negative padding, left to sm_80).
bool sm90_fits(const ConvGeometry& g, at::ScalarType dtype) {
  if (dtype != at::kHalf && dtype != at::kBFloat16) return false;
  if (g.pad_h > g.kernel_h - 1 || g.pad_w > g.kernel_w - 1) return false;
  const cudaDeviceProp* properties = at::cuda::getCurrentDeviceProperties();
  return properties->major == 9 && properties->minor == 0 && conv2d_cutlass_fits(g, dtype);
}

// Output tiles of the wgrad GEMM (C_out x C_in*kh*kw) from which one CTA per tile fills an H100
// (132 SMs) about once; below that the sm_80 kernel's split-K spreads the pixel reduction.
// A shape-only rule, so that which kernel (and summation order) runs does not depend on the GPU.
constexpr int64_t kWgradMinTiles = 128;

}  // namespace

bool conv2d_sm90_built() { return true; }

at::Tensor conv2d_forward_sm90(const ConvGeometry& g, const at::Tensor& input, const at::Tensor& weight,
                               const at::Tensor& bias, bool relu) {
  if (!sm90_fits(g, input.scalar_type())) return at::Tensor();
  if (input.scalar_type() == at::kHalf) {
    return relu ? run_fprop<cutlass::half_t, true>(g, input, weight, bias)
                : run_fprop<cutlass::half_t, false>(g, input, weight, bias);
  }
  return relu ? run_fprop<cutlass::bfloat16_t, true>(g, input, weight, bias)
              : run_fprop<cutlass::bfloat16_t, false>(g, input, weight, bias);
}

at::Tensor conv2d_dgrad_sm90(const ConvGeometry& g, const at::Tensor& grad, const at::Tensor& weight) {
  if (!sm90_fits(g, grad.scalar_type())) return at::Tensor();
  return grad.scalar_type() == at::kHalf ? run_dgrad<cutlass::half_t>(g, grad, weight)
                                         : run_dgrad<cutlass::bfloat16_t>(g, grad, weight);
}

at::Tensor conv2d_wgrad_sm90(const ConvGeometry& g, const at::Tensor& grad, const at::Tensor& input) {
  if (!sm90_fits(g, grad.scalar_type())) return at::Tensor();
  const int64_t tiles = ((g.out_channels + 127) / 128) * ((g.in_channels * g.kernel_h * g.kernel_w + 127) / 128);
  if (tiles < kWgradMinTiles) return at::Tensor();
  return grad.scalar_type() == at::kHalf ? run_wgrad<cutlass::half_t>(g, grad, input)
                                         : run_wgrad<cutlass::bfloat16_t>(g, grad, input);
}

}  // namespace conv
}  // namespace unet_ext

#else  // built without CUTLASS or without sm_90a: the sm_80 kernels serve on Hopper too

namespace unet_ext {
namespace conv {

bool conv2d_sm90_built() { return false; }

at::Tensor conv2d_forward_sm90(const ConvGeometry&, const at::Tensor&, const at::Tensor&, const at::Tensor&, bool) {
  return at::Tensor();
}

at::Tensor conv2d_dgrad_sm90(const ConvGeometry&, const at::Tensor&, const at::Tensor&) { return at::Tensor(); }

at::Tensor conv2d_wgrad_sm90(const ConvGeometry&, const at::Tensor&, const at::Tensor&) { return at::Tensor(); }

}  // namespace conv
}  // namespace unet_ext

#endif
