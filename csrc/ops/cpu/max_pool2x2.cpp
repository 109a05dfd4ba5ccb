// max_pool2x2 on the CPU. One pass over the input at memory speed: NCHW reads the two input
// rows of an output row (the pairwise maxima vectorise over the row), channels_last takes the
// four pixels' channel vectors. The backward recomputes each window's argmax from the input
// (max_pool2x2.h's rule, as stock PyTorch picks) and writes every element of grad_input once:
// the gradient there, zeros elsewhere (an odd last row or column gets zeros).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../common/dispatch.h"
#include "../max_pool2x2_host.h"

namespace unet_ext {
namespace max_pool {
namespace {

// About 64K input elements per task.
int64_t grain(int64_t elements_per_item) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, elements_per_item));
}

template <typename scalar_t>
void forward_nchw(const Geometry& g, const scalar_t* in, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = g.batch * g.channels * g.out_h;
  at::parallel_for(0, rows, grain(2 * g.in_w), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t plane = r / g.out_h, oh = r % g.out_h;
      const scalar_t* top = in + (plane * g.in_h + 2 * oh) * g.in_w;
      const scalar_t* bottom = top + g.in_w;
      scalar_t* dst = out + r * g.out_w;
      for (int64_t ow = 0; ow < g.out_w; ++ow) {
        dst[ow] = static_cast<scalar_t>(window_max<acc_t>(top[2 * ow], top[2 * ow + 1], bottom[2 * ow], bottom[2 * ow + 1]));
      }
    }
  });
}

// One channels_last window's C channels. restrict (the output never overlaps the input): without
// it GCC keeps the loop scalar, 6x slower in bf16 (80 ms against 14 ms for NCHW at 64x568x568).
template <typename scalar_t>
void forward_channels(int64_t C, const scalar_t* __restrict__ v00, const scalar_t* __restrict__ v01,
                      const scalar_t* __restrict__ v10, const scalar_t* __restrict__ v11,
                      scalar_t* __restrict__ o) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t c = 0; c < C; ++c) {
    o[c] = static_cast<scalar_t>(window_max<acc_t>(v00[c], v01[c], v10[c], v11[c]));
  }
}

template <typename scalar_t>
void forward_nhwc(const Geometry& g, const scalar_t* in, scalar_t* out) {
  const int64_t C = g.channels, row = g.in_w * C;
  at::parallel_for(0, g.batch * g.out_h, grain(2 * row), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / g.out_h, oh = r % g.out_h;
      const scalar_t* top = in + (n * g.in_h + 2 * oh) * row;
      scalar_t* dst = out + r * g.out_w * C;
      for (int64_t ow = 0; ow < g.out_w; ++ow) {
        const scalar_t* p00 = top + 2 * ow * C;
        const scalar_t* p01 = p00 + C;
        const scalar_t* p10 = p00 + row;
        const scalar_t* p11 = p10 + C;
        forward_channels(C, p00, p01, p10, p11, dst + ow * C);
      }
    }
  });
}

// Gradient of one window: g at the argmax (the last element that takes over), 0 at the others,
// handed down from v11 to v00 as "what is left" so that each store is one select: a form GCC
// vectorises over channels (branches on random data would mispredict).
template <typename scalar_t>
inline void scatter_window(scalar_t g_val, Takes t, scalar_t* d00, scalar_t* d01, scalar_t* d10, scalar_t* d11) {
  const scalar_t zero(0);
  *d11 = t.v11 ? g_val : zero;
  const scalar_t left11 = t.v11 ? zero : g_val;
  *d10 = t.v10 ? left11 : zero;
  const scalar_t left10 = t.v10 ? zero : left11;
  *d01 = t.v01 ? left10 : zero;
  *d00 = t.v01 ? zero : left10;
}

template <typename scalar_t>
void backward_nchw(const Geometry& g, const scalar_t* grad_out, const scalar_t* in, scalar_t* grad_in) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t planes = g.batch * g.channels;
  // One item = one input row pair (or the odd last row) of one plane.
  const int64_t pairs = (g.in_h + 1) / 2;
  at::parallel_for(0, planes * pairs, grain(2 * g.in_w), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t plane = i / pairs, oh = i % pairs;
      scalar_t* d_top = grad_in + (plane * g.in_h + 2 * oh) * g.in_w;
      if (oh == g.out_h) {  // the odd last row: no window reads it
        std::fill(d_top, d_top + g.in_w, scalar_t(0));
        continue;
      }
      const scalar_t* top = in + (plane * g.in_h + 2 * oh) * g.in_w;
      const scalar_t* bottom = top + g.in_w;
      scalar_t* d_bottom = d_top + g.in_w;
      const scalar_t* go = grad_out + (plane * g.out_h + oh) * g.out_w;
      for (int64_t ow = 0; ow < g.out_w; ++ow) {
        const Takes takes = window_takes<acc_t>(top[2 * ow], top[2 * ow + 1], bottom[2 * ow], bottom[2 * ow + 1]);
        scatter_window(go[ow], takes, d_top + 2 * ow, d_top + 2 * ow + 1, d_bottom + 2 * ow, d_bottom + 2 * ow + 1);
      }
      if (g.in_w % 2 == 1) d_top[g.in_w - 1] = d_bottom[g.in_w - 1] = scalar_t(0);
    }
  });
}

// One channels_last window's C channels. restrict (the four pixels never overlap) and the
// pointers as parameters let GCC vectorise the loop over channels.
template <typename scalar_t>
void backward_channels(int64_t C, const scalar_t* __restrict__ v00, const scalar_t* __restrict__ v01,
                       const scalar_t* __restrict__ v10, const scalar_t* __restrict__ v11,
                       const scalar_t* __restrict__ grad, scalar_t* __restrict__ d00, scalar_t* __restrict__ d01,
                       scalar_t* __restrict__ d10, scalar_t* __restrict__ d11) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t c = 0; c < C; ++c) {
    const Takes takes = window_takes<acc_t>(v00[c], v01[c], v10[c], v11[c]);
    scatter_window(grad[c], takes, d00 + c, d01 + c, d10 + c, d11 + c);
  }
}

template <typename scalar_t>
void backward_nhwc(const Geometry& g, const scalar_t* grad_out, const scalar_t* in, scalar_t* grad_in) {
  const int64_t C = g.channels, row = g.in_w * C;
  const int64_t pairs = (g.in_h + 1) / 2;
  at::parallel_for(0, g.batch * pairs, grain(2 * row), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / pairs, oh = i % pairs;
      scalar_t* d_top = grad_in + (n * g.in_h + 2 * oh) * row;
      if (oh == g.out_h) {
        std::fill(d_top, d_top + row, scalar_t(0));
        continue;
      }
      const scalar_t* top = in + (n * g.in_h + 2 * oh) * row;
      const scalar_t* go = grad_out + (n * g.out_h + oh) * g.out_w * C;
      for (int64_t ow = 0; ow < g.out_w; ++ow) {
        const int64_t at = 2 * ow * C;
        backward_channels(C, top + at, top + at + C, top + at + row, top + at + row + C, go + ow * C,
                          d_top + at, d_top + at + C, d_top + at + row, d_top + at + row + C);
      }
      if (g.in_w % 2 == 1) {
        std::fill(d_top + (g.in_w - 1) * C, d_top + row, scalar_t(0));
        std::fill(d_top + row + (g.in_w - 1) * C, d_top + 2 * row, scalar_t(0));
      }
    }
  });
}

at::Tensor max_pool2x2_cpu(const at::Tensor& input_arg) {
  at::Tensor input = input_arg, out;
  const Geometry g = forward_geometry(input, out);
  if (out.numel() == 0) return out;
  UNET_DISPATCH_FLOATING_TYPES(input.scalar_type(), "max_pool2x2_cpu", [&] {
    const scalar_t* in = input.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    g.channels_last ? forward_nhwc(g, in, dst) : forward_nchw(g, in, dst);
  });
  return out;
}

at::Tensor max_pool2x2_backward_cpu(const at::Tensor& grad_out_arg, const at::Tensor& input_arg) {
  at::Tensor grad_out = grad_out_arg, input = input_arg, grad_input;
  const Geometry g = backward_geometry(grad_out, input, grad_input);
  if (grad_input.numel() == 0) return grad_input;
  UNET_DISPATCH_FLOATING_TYPES(input.scalar_type(), "max_pool2x2_backward_cpu", [&] {
    const scalar_t* go = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* in = input.const_data_ptr<scalar_t>();
    scalar_t* gi = grad_input.mutable_data_ptr<scalar_t>();
    g.channels_last ? backward_nhwc(g, go, in, gi) : backward_nchw(g, go, in, gi);
  });
  return grad_input;
}

}  // namespace
}  // namespace max_pool
}  // namespace unet_ext

TORCH_LIBRARY_IMPL(unet_ext, CPU, m) {
  m.impl("max_pool2x2", &unet_ext::max_pool::max_pool2x2_cpu);
  m.impl("_max_pool2x2_backward", &unet_ext::max_pool::max_pool2x2_backward_cpu);
}
