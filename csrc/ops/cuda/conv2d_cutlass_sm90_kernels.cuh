// The Hopper conv kernels (CUTLASS 3.x: TMA im2col loads into shared memory, warp-specialised
// wgmma mainloop, fp32 accumulation) and their host runners, as templates: each
// conv2d_cutlass_sm90_<op>_<dtype>.cu instantiates one (one kernel per file keeps the build's
// critical path short and its memory sane). fprop's epilogue is D = [relu](acc + bias[k]) (the
// fusion's per-column bias: GEMM N = C_out); dgrad writes dx; wgrad writes dW in fp32.
// Include only from those files: they are built with the nvidia-cutlass headers and sm_90a.
#pragma once

#include <cstdint>
#include <type_traits>

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
#include "conv2d_cutlass_sm90_kernels.h"
#include "cutlass_conv.cuh"

namespace unet_ext {
namespace conv {
namespace sm90 {

using cutlass_conv::launch;  // CUTLASS 3's ConvUniversalAdapter has the 2.x device interface
using cutlass_conv::pointer;

// 128x128 output tiles with a 64-deep K step: 32 KiB of A+B per stage, so the builder fits about
// six stages beside the epilogue's buffers in the 227 KiB of shared memory. One CTA per cluster.
using TileShape = cute::Shape<cute::_128, cute::_128, cute::Shape<cute::_64>>;
// 128x64 tiles for fprop into at most 64 channels (the paper's first and last levels): a 128-wide
// tile leaves half its MMA columns idle there (lease 2: 150-190 TFLOP/s on those layers against
// 400-540 on the deep ones).
using NarrowTileShape = cute::Shape<cute::_128, cute::_64, cute::Shape<cute::_64>>;
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

template <typename element_t, bool kRelu, bool kNarrow>
using FpropConv = Sm90Conv<
    cutlass::conv::Operator::kFprop, element_t,
    cutlass::epilogue::fusion::LinCombPerColBiasEltAct<Activation<kRelu>::template Fn, element_t, float,
                                                       element_t, element_t>,
    element_t, std::conditional_t<kNarrow, NarrowTileShape, TileShape>>;

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

// The runners take packed operands (NHWC / KRSC, 16-byte aligned) and write the caller's
// output, which may be a batch slice of a bigger channels_last tensor (still packed).
template <typename element_t, bool kRelu, bool kNarrow>
bool fprop(const ConvGeometry& g, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
           const at::Tensor& output) {
  return run_conv<FpropConv<element_t, kRelu, kNarrow>>(
      g, pointer<element_t>(x), pointer<element_t>(w), pointer<element_t>(output), x.options(),
      [&](auto& fusion) { fusion.bias_ptr = b.defined() ? pointer<element_t>(b) : nullptr; });  // null: zeros
}

template <typename element_t>
bool dgrad(const ConvGeometry& g, const at::Tensor& dy, const at::Tensor& w, const at::Tensor& dx) {
  return run_conv<DgradConv<element_t>>(g, pointer<element_t>(dy), pointer<element_t>(w), pointer<element_t>(dx),
                                        dy.options(), kNoFusionArguments);
}

template <typename element_t>
bool wgrad(const ConvGeometry& g, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& dw) {
  return run_conv<WgradConv<element_t>>(g, pointer<element_t>(dy), pointer<element_t>(x),
                                        pointer<float>(dw), dy.options(), kNoFusionArguments);
}

}  // namespace sm90
}  // namespace conv
}  // namespace unet_ext
