// crop_concat on CUDA: the destination decomposes into runs (crop_concat.h). A "team" of
// 1..32 lanes of one warp copies one run, lanes striding over it, so consecutive lanes touch
// consecutive bytes. Unit-stride runs whose source and destination share their alignment mod
// 16 bytes move as uint4 (16-byte) words between a scalar head and tail. The copy depends only
// on the element size: one instantiation per size (1/2/4/8 bytes) serves every dtype.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

#include "../crop_concat_host.h"

namespace unet_ext {
namespace crop_concat {
namespace {

constexpr int kThreads = 256;
enum Pass : int { kForwardPass = 0, kGradSkipPass = 1, kGradUpPass = 2 };

// Copies (or zero-fills) one run with `team` lanes; `lane` is this thread's rank in the team.
template <typename word_t>
__device__ __forceinline__ void copy_run(const Run& run, word_t* __restrict__ dst_base,
                                         const word_t* __restrict__ src_base, int lane, int team) {
  constexpr int64_t kWords = 16 / sizeof(word_t);  // elements per uint4
  if (run.length <= 0) return;
  word_t* dst = dst_base + run.dst;
  const uintptr_t dst_addr = reinterpret_cast<uintptr_t>(dst);
  const word_t* src = run.source == kZero ? nullptr : src_base + run.src;
  // Vector path: zero fill, or a unit-stride copy whose two ends can be aligned together.
  const bool vector = run.source == kZero ||
                      (run.src_step == 1 && ((dst_addr ^ reinterpret_cast<uintptr_t>(src)) & 15) == 0);
  if (vector) {
    // Elements before dst reaches a 16-byte boundary (dst is element-aligned: a fresh tensor).
    const int64_t misaligned = static_cast<int64_t>(((16 - (dst_addr & 15)) & 15) / sizeof(word_t));
    const int64_t head = misaligned < run.length ? misaligned : run.length;
    const int64_t body = (run.length - head) / kWords;  // uint4 words
    const int64_t scalars = run.length - body * kWords;  // head + tail elements
    uint4* dst_vec = reinterpret_cast<uint4*>(dst + head);
    if (run.source == kZero) {
      for (int64_t i = lane; i < body; i += team) dst_vec[i] = make_uint4(0, 0, 0, 0);
      for (int64_t j = lane; j < scalars; j += team) dst[j < head ? j : j + body * kWords] = word_t(0);
    } else {
      const uint4* src_vec = reinterpret_cast<const uint4*>(src + head);
      for (int64_t i = lane; i < body; i += team) dst_vec[i] = __ldg(src_vec + i);
      for (int64_t j = lane; j < scalars; j += team) {
        const int64_t e = j < head ? j : j + body * kWords;
        dst[e] = src[e];
      }
    }
  } else if (run.src_step == 1) {
    for (int64_t i = lane; i < run.length; i += team) dst[i] = src[i];
  } else {
    for (int64_t i = lane; i < run.length; i += team) dst[i] = src[i * run.src_step];
  }
}

// One launch per destination tensor: teams walk that tensor's runs (grid-stride).
template <typename word_t, int kPass>
__global__ void __launch_bounds__(kThreads)
copy_runs_kernel(const Geometry g, const word_t* __restrict__ skip, const word_t* __restrict__ up,
                 const word_t* __restrict__ grad, word_t* __restrict__ dst, int64_t runs,
                 int team_shift) {
  const int team = 1 << team_shift;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int lane = static_cast<int>(thread & (team - 1));
  const int64_t teams = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> team_shift;
  for (int64_t r = thread >> team_shift; r < runs; r += teams) {
    if constexpr (kPass == kForwardPass) {
      for (int s = 0; s < g.forward_segments(); ++s) {
        const Run run = g.forward_run(r, s);
        copy_run(run, dst, run.source == kSkip ? skip : up, lane, team);
      }
    } else if constexpr (kPass == kGradSkipPass) {
      for (int s = 0; s < g.grad_skip_segments(); ++s) copy_run(g.grad_skip_run(r, s), dst, grad, lane, team);
    } else {
      copy_run(g.grad_up_run(r), dst, grad, lane, team);
    }
  }
}

// log2 of the team size: about one lane per 16 bytes of the longest run (one per element when
// the source is strided), a power of two in [1, 32] so a team never straddles a warp.
int team_shift_for(int64_t run_length, bool unit_stride, int64_t element_size) {
  const int64_t per_lane = unit_stride ? 16 / element_size : 1;
  const int64_t lanes = (run_length + per_lane - 1) / per_lane;
  int shift = 0;
  while (shift < 5 && (int64_t{1} << shift) < lanes) ++shift;
  return shift;
}

template <typename word_t, int kPass>
void launch(const Geometry& g, const at::Tensor& skip, const at::Tensor& up, const at::Tensor& grad,
            at::Tensor& dst, int64_t runs, int64_t run_length, bool unit_stride) {
  if (runs == 0 || dst.numel() == 0) return;
  const int team_shift = team_shift_for(run_length, unit_stride, sizeof(word_t));
  const int64_t teams_per_block = kThreads >> team_shift;
  // Enough blocks for a few waves; the grid-stride loop covers the rest.
  const int64_t max_blocks = int64_t{32} * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = std::min((runs + teams_per_block - 1) / teams_per_block, max_blocks);
  auto pointer = [](const at::Tensor& t) {
    return t.defined() ? static_cast<const word_t*>(t.const_data_ptr()) : nullptr;
  };
  copy_runs_kernel<word_t, kPass><<<static_cast<unsigned>(blocks), kThreads, 0,
                                    at::cuda::getCurrentCUDAStream()>>>(
      g, pointer(skip), pointer(up), pointer(grad), static_cast<word_t*>(dst.mutable_data_ptr()),
      runs, team_shift);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename word_t>
struct Forward {
  static void run(const Geometry& g, const at::Tensor& skip, const at::Tensor& up, at::Tensor& out) {
    const bool unit = g.channels_last ? (g.skip.c == 1 && g.up.c == 1) : (g.skip.w == 1 && g.up.w == 1);
    const int64_t length = g.channels_last ? std::max(g.skip_channels, g.up_channels) : g.width;
    launch<word_t, kForwardPass>(g, skip, up, at::Tensor(), out, g.forward_runs(), length, unit);
  }
};

template <typename word_t>
struct Backward {
  static void run(const Geometry& g, const at::Tensor& grad, at::Tensor& grad_skip, at::Tensor& grad_up) {
    const bool unit = (g.channels_last ? g.grad.c : g.grad.w) == 1;
    launch<word_t, kGradSkipPass>(g, at::Tensor(), at::Tensor(), grad, grad_skip, g.grad_skip_runs(),
                                  g.channels_last ? g.skip_channels : g.width, unit);
    launch<word_t, kGradUpPass>(g, at::Tensor(), at::Tensor(), grad, grad_up, g.grad_up_runs(),
                                g.channels_last ? g.up_channels : g.width, unit);
  }
};

at::Tensor crop_concat_cuda(const at::Tensor& skip, const at::Tensor& up) {
  at::Tensor out;
  const Geometry g = forward_geometry(skip, up, out);  // checks devices; out lives on skip's
  const c10::cuda::CUDAGuard device_guard(skip.device());
  if (out.numel() == 0) return out;
  dispatch_element_size<Forward>(skip.element_size(), g, skip, up, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor> crop_concat_backward_cuda(const at::Tensor& grad_out,
                                                             int64_t skip_channels,
                                                             int64_t skip_height,
                                                             int64_t skip_width) {
  const c10::cuda::CUDAGuard device_guard(grad_out.device());
  at::Tensor grad_skip, grad_up;
  const Geometry g =
      backward_geometry(grad_out, skip_channels, skip_height, skip_width, grad_skip, grad_up);
  if (grad_skip.numel() + grad_up.numel() == 0) return {grad_skip, grad_up};
  dispatch_element_size<Backward>(grad_out.element_size(), g, grad_out, grad_skip, grad_up);
  return {grad_skip, grad_up};
}

}  // namespace
}  // namespace crop_concat
}  // namespace unet_ext

TORCH_LIBRARY_IMPL(unet_ext, CUDA, m) {
  m.impl("crop_concat", &unet_ext::crop_concat::crop_concat_cuda);
  m.impl("_crop_concat_backward", &unet_ext::crop_concat::crop_concat_backward_cuda);
}
