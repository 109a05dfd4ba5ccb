// weighted_cross_entropy on CUDA: one thread per pixel of the (N, C, S) view (see
// weighted_cross_entropy.h), reading its C logits with the view's strides; online logsumexp.
// Mean/sum: a deterministic two-stage sum (double partials per block in a fixed tree order,
// then one block adds them in index order): bit-identical on every run, no host sync.
// The backward reads the upstream scalar and total_weight through device pointers.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <limits>

#include "../common/checks.h"
#include "../common/dispatch.h"
#include "../weighted_cross_entropy_host.h"

namespace unet_ext {
namespace wce {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// The forward grid depends on the problem size only (not on the GPU), so the partials, and
// the order they are added in, are the same everywhere. Larger problems grid-stride.
constexpr int64_t kMaxForwardBlocks = 4096;
constexpr int kFinalThreads = 512;
// An explicit minimum of resident blocks: with a bare __launch_bounds__(256), CUDA 13's ptxas
// squeezes the float64 backward into 48 registers and spills; 2 blocks allow up to 128.
constexpr int kMinBlocks = 2;

// Precise exp/log (no --use_fast_math: __expf/__logf miss the float32 tolerance near loss 0).
__device__ __forceinline__ float exp_of(float x) { return expf(x); }
__device__ __forceinline__ double exp_of(double x) { return exp(x); }
__device__ __forceinline__ float log_of(float x) { return logf(x); }
__device__ __forceinline__ double log_of(double x) { return log(x); }

struct PixelTarget {
  int64_t cls;   // the target class, clamped into [0, C) so loads stay in bounds
  bool counted;  // neither ignored nor out of range
  bool bad;      // out of range and not ignore_index: the kernel asserts on it
};

__device__ __forceinline__ PixelTarget read_target(const Geometry& g, const int64_t* target,
                                                   int64_t n, int64_t s) {
  const int64_t t = target[n * g.target_n + s * g.target_s];
  const bool ignored = is_ignored(t, g.ignore_index);
  const bool valid = in_range(t, g.classes);
  return {valid ? t : 0, !ignored && valid, !ignored && !valid};
}

// Grid-stride walk over pixels p = n * S + s that divides only once per thread: a 64-bit
// division in the loop is a subroutine call, and ptxas spills the loop's registers around it.
struct PixelWalk {
  int64_t p, n, s;                // current pixel
  int64_t step, step_n, step_s;   // grid stride, and the same as (n, s) increments
  int64_t total, pixels;

  __device__ __forceinline__ explicit PixelWalk(const Geometry& g) {
    pixels = g.pixels;
    total = g.batch * g.pixels;
    step = static_cast<int64_t>(gridDim.x) * blockDim.x;
    p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    n = p / pixels;
    s = p - n * pixels;
    step_n = step / pixels;
    step_s = step - step_n * pixels;
  }
  __device__ __forceinline__ bool valid() const { return p < total; }
  __device__ __forceinline__ void next() {
    p += step;
    n += step_n;
    s += step_s;
    if (s >= pixels) {
      s -= pixels;
      ++n;
    }
  }
};

// class_weight[t] for counted pixels, 0 otherwise: the mean's denominator term.
template <typename acc_t>
__device__ __forceinline__ acc_t class_factor(const PixelTarget& t, const acc_t* class_weight) {
  if (!t.counted) return acc_t(0);
  return class_weight != nullptr ? class_weight[t.cls] : acc_t(1);
}

// Sum over the block in a fixed tree order (deterministic); the result is valid in thread 0.
__device__ __forceinline__ double block_sum(double v, double* shared) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // `shared` may still be read by a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  const int warps = blockDim.x / 32;
  if (warp == 0) {
    v = lane < warps ? shared[lane] : 0.0;
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
forward_kernel(const Geometry g, const scalar_t* __restrict__ logits,
               const int64_t* __restrict__ target, const acc_t* __restrict__ weight_map,
               const acc_t* __restrict__ class_weight, acc_t* __restrict__ loss_map,
               acc_t* __restrict__ lse_out, double* __restrict__ partials) {
  __shared__ double shared[kWarps];
  double loss_sum = 0.0, weight_sum = 0.0;
  bool bad_target = false;
  for (PixelWalk w(g); w.valid(); w.next()) {
    const int64_t p = w.p, n = w.n, s = w.s;
    const PixelTarget t = read_target(g, target, n, s);
    bad_target |= t.bad;
    const scalar_t* x = logits + g.logit_offset(n, 0, s);
    acc_t running_max = -std::numeric_limits<acc_t>::infinity(), running_sum = acc_t(0), picked = acc_t(0);
    for (int64_t c = 0; c < g.classes; ++c) {
      const acc_t v = static_cast<acc_t>(x[c * g.logits.c]);
      logsumexp_update(running_max, running_sum, v, [](acc_t a) { return exp_of(a); });
      picked = c == t.cls ? v : picked;
    }
    // The CPU kernel computes max + log(sum exp(x - max)), where a +inf logit gives
    // exp(inf - inf) = NaN; the online form's "+1" would give inf instead. Match the CPU.
    const acc_t lse = running_max == std::numeric_limits<acc_t>::infinity()
                          ? std::numeric_limits<acc_t>::quiet_NaN()
                          : running_max + log_of(running_sum);
    lse_out[p] = lse;
    const acc_t cf = class_factor(t, class_weight);
    const acc_t factor = weight_map != nullptr ? cf * weight_map[n * g.weight_n + s * g.weight_s] : cf;
    // factor == 0 (ignored pixel, zero weight) gives exactly 0, even for inf/NaN logits.
    const acc_t loss = factor != acc_t(0) ? factor * (lse - picked) : acc_t(0);
    if (loss_map != nullptr) loss_map[p] = loss;
    loss_sum += static_cast<double>(loss);
    weight_sum += static_cast<double>(cf);
  }
  // Asserted once, after the loop: an __assert_fail call inside it makes ptxas save the
  // loop's live registers around the call (reported as spills).
  CUDA_KERNEL_ASSERT(!bad_target && "target out of range [0, C) and not ignore_index");
  loss_sum = block_sum(loss_sum, shared);
  weight_sum = block_sum(weight_sum, shared);
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = loss_sum;
    partials[gridDim.x + blockIdx.x] = weight_sum;
  }
}

// One block: adds the forward's partials in index order, writes total_weight and the loss.
template <typename acc_t>
__global__ void __launch_bounds__(kFinalThreads)
finalize_kernel(const double* __restrict__ partials, int64_t num_partials, int reduction,
                acc_t* __restrict__ loss, acc_t* __restrict__ total_weight) {
  __shared__ double shared[kFinalThreads / 32];
  double loss_sum = 0.0, weight_sum = 0.0;
  for (int64_t i = threadIdx.x; i < num_partials; i += blockDim.x) {
    loss_sum += partials[i];
    weight_sum += partials[num_partials + i];
  }
  loss_sum = block_sum(loss_sum, shared);
  weight_sum = block_sum(weight_sum, shared);
  if (threadIdx.x == 0) {
    *total_weight = static_cast<acc_t>(weight_sum);
    // Division in double, then one rounding to the opmath dtype, as on the CPU. 0/0 = NaN
    // (nothing counted) like F.cross_entropy's mean.
    if (reduction == kSum) *loss = static_cast<acc_t>(loss_sum);
    if (reduction == kMean) *loss = static_cast<acc_t>(loss_sum / weight_sum);
  }
}

// d loss / d logits[c] = coef * (softmax[c] - [c == t]), coef = weight * class_weight[t] * grad.
// coef is 0 for ignored pixels but multiplies, not selects: a NaN logit there still gives NaN
// (as the CPU kernel and stock PyTorch's log_softmax backward do).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
backward_kernel(const Geometry g, const scalar_t* __restrict__ logits,
                const int64_t* __restrict__ target, const acc_t* __restrict__ weight_map,
                const acc_t* __restrict__ class_weight, const acc_t* __restrict__ lse_in,
                const acc_t* __restrict__ grad_loss, const acc_t* __restrict__ total_weight,
                scalar_t* __restrict__ grad_logits) {
  // Scalar upstream grad ('sum'/'mean'): read on the device, no host sync.
  acc_t grad_scalar = acc_t(0);
  if (g.reduction != kNone) {
    grad_scalar = *grad_loss;
    if (g.reduction == kMean) grad_scalar /= *total_weight;
  }
  const PixelStrides gs = g.grad_logits;
  bool bad_target = false;
  for (PixelWalk w(g); w.valid(); w.next()) {
    const int64_t p = w.p, n = w.n, s = w.s;
    const PixelTarget t = read_target(g, target, n, s);
    bad_target |= t.bad;
    const acc_t cf = class_factor(t, class_weight);
    acc_t coef = weight_map != nullptr ? cf * weight_map[n * g.weight_n + s * g.weight_s] : cf;
    coef *= g.reduction == kNone ? grad_loss[n * g.grad_n + s * g.grad_s] : grad_scalar;
    if (!t.counted && !t.bad) coef = acc_t(0);  // ignored: stock's 0, not 0 * inf = NaN (all ignored: mean / 0)
    const acc_t lse = lse_in[p];
    const int64_t target_class = t.counted ? t.cls : -1;  // ignored: no one-hot term
    const scalar_t* x = logits + g.logit_offset(n, 0, s);
    scalar_t* out = grad_logits + n * gs.n + s * gs.s;
    for (int64_t c = 0; c < g.classes; ++c) {
      const acc_t onehot = c == target_class ? acc_t(1) : acc_t(0);
      const acc_t v = static_cast<acc_t>(x[c * g.logits.c]);
      out[c * gs.c] = static_cast<scalar_t>(coef * (exp_of(v - lse) - onehot));
    }
  }
  CUDA_KERNEL_ASSERT(!bad_target && "target out of range [0, C) and not ignore_index");
}

int64_t blocks_for(int64_t items, int64_t cap) {
  return std::max<int64_t>(1, std::min((items + kThreads - 1) / kThreads, cap));
}

template <typename T>
const T* optional_ptr(bool has, const at::Tensor& t) {
  return has ? t.const_data_ptr<T>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cuda(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight_map,
    const std::optional<at::Tensor>& class_weight, int64_t ignore_index, c10::string_view reduction,
    bool opmath_loss) {
  Prepared p = prepare("unet_ext.weighted_cross_entropy", logits, target, weight_map, class_weight,
                       ignore_index, reduction);  // checks devices first: no guard on a CPU tensor
  const c10::cuda::CUDAGuard device_guard(logits.device());
  ForwardOutputs out = allocate_forward(p);
  const Geometry& g = p.geometry;
  const int64_t pixels = g.batch * g.pixels;
  const auto stream = at::cuda::getCurrentCUDAStream();
  // No early return on empty input: total_weight (0) and the 'sum'/'mean' scalar (0, NaN)
  // are still written, by the finalize kernel over zero partials.
  const int64_t blocks = pixels > 0 ? blocks_for(pixels, kMaxForwardBlocks) : 0;
  at::Tensor partials = at::empty({2 * blocks}, p.logits.options().dtype(at::kDouble));
  UNET_DISPATCH_FLOATING_TYPES(p.logits.scalar_type(), "weighted_cross_entropy_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (blocks > 0) {
      forward_kernel<scalar_t, acc_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          g, p.logits.const_data_ptr<scalar_t>(), p.target.const_data_ptr<int64_t>(),
          optional_ptr<acc_t>(g.has_weight_map, p.weight_map),
          optional_ptr<acc_t>(g.has_class_weight, p.class_weight),
          g.reduction == kNone ? out.loss.mutable_data_ptr<acc_t>() : nullptr,
          out.logsumexp.mutable_data_ptr<acc_t>(), partials.mutable_data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    finalize_kernel<acc_t><<<1, kFinalThreads, 0, stream>>>(
        partials.const_data_ptr<double>(), blocks, g.reduction,
        g.reduction == kNone ? nullptr : out.loss.mutable_data_ptr<acc_t>(),
        out.total_weight.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return finish_forward(p, out, opmath_loss);
}

at::Tensor backward_cuda(const at::Tensor& grad_loss, const at::Tensor& logits,
                         const at::Tensor& target, const std::optional<at::Tensor>& weight_map,
                         const std::optional<at::Tensor>& class_weight, const at::Tensor& logsumexp,
                         const at::Tensor& total_weight, int64_t ignore_index,
                         c10::string_view reduction) {
  constexpr const char* op = "unet_ext._weighted_cross_entropy_backward";
  // The kernel dereferences these on the device: they must live there.
  UNET_CHECK_SAME_DEVICE(op, logits, logsumexp);
  UNET_CHECK_SAME_DEVICE(op, logits, total_weight);
  Prepared p = prepare(op, logits, target, weight_map, class_weight, ignore_index, reduction);
  const c10::cuda::CUDAGuard device_guard(logits.device());
  at::Tensor grad = grad_loss;  // in opmath dtype after prepare_backward
  at::Tensor grad_logits = prepare_backward(p, grad, logsumexp, total_weight);
  if (grad_logits.numel() == 0) return grad_logits;
  const Geometry& g = p.geometry;
  const int64_t pixels = g.batch * g.pixels;
  // Grid-stride past ~2 waves of a large GPU; the backward has no reduction to keep fixed.
  const int64_t cap = int64_t{64} * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  UNET_DISPATCH_FLOATING_TYPES(p.logits.scalar_type(), "weighted_cross_entropy_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_kernel<scalar_t, acc_t><<<static_cast<unsigned>(blocks_for(pixels, cap)), kThreads, 0,
                                       at::cuda::getCurrentCUDAStream()>>>(
        g, p.logits.const_data_ptr<scalar_t>(), p.target.const_data_ptr<int64_t>(),
        optional_ptr<acc_t>(g.has_weight_map, p.weight_map),
        optional_ptr<acc_t>(g.has_class_weight, p.class_weight), logsumexp.const_data_ptr<acc_t>(),
        grad.const_data_ptr<acc_t>(), total_weight.const_data_ptr<acc_t>(),
        grad_logits.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_logits;
}

}  // namespace
}  // namespace wce
}  // namespace unet_ext

TORCH_LIBRARY_IMPL(unet_ext, CUDA, m) {
  m.impl("_weighted_cross_entropy_forward", &unet_ext::wce::forward_cuda);
  m.impl("_weighted_cross_entropy_backward", &unet_ext::wce::backward_cuda);
}
