// CUTLASS 2.x implicit-GEMM convolution kernels shared by conv2d_cutlass.cu and
// conv_transpose2x2_cutlass.cu (sm_80 mma.sync, which sm_90 runs too): NHWC activations, KRSC
// filters, fp32 accumulation; half and bfloat16, and float as TF32 (the MMA rounds float
// operands to tf32). Plus the host plumbing: packing, alignment, launch on the current stream.
// Include only from .cu files built with the nvidia-cutlass headers (UNET_EXT_WITH_CUTLASS).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cutlass/bfloat16.h"
// The kernel headers first: the device header uses helpers they bring in.
#include "cutlass/conv/kernel/default_conv2d_dgrad.h"
#include "cutlass/conv/kernel/default_conv2d_fprop.h"
#include "cutlass/conv/kernel/default_conv2d_wgrad.h"
#include "cutlass/conv/device/implicit_gemm_convolution.h"
#include "cutlass/conv/threadblock/threadblock_swizzle.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/epilogue/thread/linear_combination_relu.h"
#include "cutlass/half.h"

#include "../conv2d_relu.h"

namespace unet_ext {
namespace conv {
namespace cutlass_conv {

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
// kUnity: unit stride (conv2d_relu), the unity-stride optimized iterators; kStrided: CUTLASS's
// strided dgrad (its own threadblock swizzle), which the 2x2 stride-2 up-conv's forward is.
// Epilogue: D = acc (kNothing, no C read) or D = acc + C with C a broadcast bias row.
template <typename element_t, cutlass::conv::StrideSupport kStride = cutlass::conv::StrideSupport::kUnity,
          bool kBias = false>
struct Dgrad {
  using Layout = cutlass::layout::TensorNHWC;
  using Epilogue = cutlass::epilogue::thread::LinearCombination<
      element_t, kAlignment<element_t>, float, float,
      kBias ? cutlass::epilogue::thread::ScaleType::NoBetaScaling : cutlass::epilogue::thread::ScaleType::Nothing>;
  using Swizzle = std::conditional_t<kStride == cutlass::conv::StrideSupport::kStrided,
                                     cutlass::conv::threadblock::StridedDgradIdentityThreadblockSwizzle<1>,
                                     cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>>;
  using T = Tiles<element_t>;
  using Kernel = typename cutlass::conv::kernel::DefaultConv2dDgrad<
      element_t, Layout, element_t, Layout, element_t, Layout, float,
      cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
      typename T::Block, typename T::Warp, typename T::Instruction, Epilogue, Swizzle, 3,
      cutlass::arch::OpMultiplyAdd, cutlass::conv::IteratorAlgorithm::kOptimized, kStride>::Kernel;
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

inline bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0; }

// t in `format`, densely packed, at a 16-byte aligned address (a view may start anywhere).
inline at::Tensor packed(const at::Tensor& t, at::MemoryFormat format) {
  at::Tensor c = t.contiguous(format);
  return aligned16(c) ? c : c.clone(format);
}

template <typename element_t>
element_t* pointer(const at::Tensor& t) {
  return reinterpret_cast<element_t*>(const_cast<void*>(t.const_data_ptr()));
}

// Returns false when CUTLASS cannot run the problem (then nothing was launched and the caller
// falls back to the generic kernels): can_implement declines it, or initialize() fails (e.g. the
// kernel's shared-memory attribute cannot be set). The workspace (serial split-K semaphores; none
// otherwise) comes from the caching allocator and is zeroed by initialize() on the current stream.
template <typename Op>
bool launch(const char* op_name, const typename Op::Arguments& arguments, const at::TensorOptions& options) {
  if (Op::can_implement(arguments) != cutlass::Status::kSuccess) return false;
  // CUTLASS's run() reports cudaGetLastError() as its own failure: an error that earlier work left
  // pending is raised here as what it is, before anything of ours is launched.
  if (const cudaError_t pending = cudaGetLastError(); pending != cudaSuccess) {
    TORCH_CHECK(false, op_name, ": a CUDA error from earlier work was pending before the CUTLASS launch: ",
                cudaGetErrorString(pending));
  }
  const size_t workspace_bytes = Op::get_workspace_size(arguments);
  at::Tensor workspace;
  if (workspace_bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(workspace_bytes)}, options.dtype(at::kByte));
  }
  Op op;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (op.initialize(arguments, workspace_bytes > 0 ? workspace.mutable_data_ptr() : nullptr, stream) !=
      cutlass::Status::kSuccess) {
    (void)cudaGetLastError();  // the failed attribute call's error is ours, and handled: fall back
    return false;
  }
  const cutlass::Status status = op.run(stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  TORCH_CHECK(status == cutlass::Status::kSuccess, op_name, ": CUTLASS launch failed");
  return true;
}

// Whether stock convolutions may run float32 as TF32: the conv flag itself, as cuDNN's convolution
// asks for it (torch >= 2.9 has torch.backends.cudnn.conv.fp32_precision beside the legacy
// allow_tf32, and allowTF32CuDNN() without an op throws when the two disagree).
inline bool allow_tf32_conv() { return at::globalContext().allowTF32CuDNN(at::Float32Op::CONV); }

// Channel alignment (elements per 128-bit access) the kernels need for `dtype`, or 0 when they do
// not take it: half/bfloat16; float as TF32 only where torch.backends.cudnn.allow_tf32 lets
// stock convolutions use TF32 too; and only on sm_80 or newer.
inline int channel_alignment(at::ScalarType dtype) {
  if (at::cuda::getCurrentDeviceProperties()->major < 8) return 0;
  if (dtype == at::kHalf || dtype == at::kBFloat16) return kAlignment<cutlass::half_t>;
  if (dtype == at::kFloat && allow_tf32_conv()) return kAlignment<float>;
  return 0;
}

// k-slices of a wgrad reduction (GEMM m x n over k pixels): about 256 tiles in all (two waves on
// 132 SMs), each slice at least 64 main-loop iterations. Depends on the shapes only, not on the
// GPU, so the summation order (and the result) is the same everywhere.
template <typename element_t>
int wgrad_slices(int64_t m, int64_t n, int64_t k) {
  using Block = typename Tiles<element_t>::Block;
  const int64_t tiles = ((m + Block::kM - 1) / Block::kM) * ((n + Block::kN - 1) / Block::kN);
  const int64_t iterations = (k + Block::kK - 1) / Block::kK;
  const int64_t by_tiles = (256 + tiles - 1) / tiles;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(by_tiles, iterations / 64)));
}

// f(element_t{}) with the CUTLASS element type of a (fitting) dtype.
template <typename F>
auto dispatch_element(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kHalf: return f(cutlass::half_t{});
    case at::kBFloat16: return f(cutlass::bfloat16_t{});
    default: return f(float{});
  }
}

// CUTLASS 2.x's can_implement refuses any tensor of 2^31 bytes or more (32-bit byte offsets in
// its iterators), so a big batch runs as launches of at most this many images each; the problem
// geometry is otherwise unchanged. 0: one image alone is too big.
inline int64_t images_per_launch(int64_t largest_image_elements, int64_t element_bytes) {
  constexpr int64_t kMaxBytes = (int64_t{1} << 31) - 1;
  const int64_t image_bytes = largest_image_elements * element_bytes;
  return image_bytes > 0 ? kMaxBytes / image_bytes : 0;
}

// run(chunk_geometry, first_image) over the batch in launches of at most `per_launch` images, in
// order (a fixed order, so chunked results are deterministic too). False when per_launch is 0 or
// any launch declines: the caller then takes the generic kernels for the whole problem.
template <typename Run>
bool for_each_batch_chunk(const ConvGeometry& g, int64_t per_launch, Run&& run) {
  if (per_launch <= 0) return false;
  for (int64_t first = 0; first < g.batch; first += per_launch) {
    ConvGeometry chunk = g;
    chunk.batch = std::min(per_launch, g.batch - first);
    if (!run(chunk, first)) return false;
  }
  return true;
}

}  // namespace cutlass_conv
}  // namespace conv
}  // namespace unet_ext
