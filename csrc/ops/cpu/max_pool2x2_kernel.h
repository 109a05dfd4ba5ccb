// max_pool2x2's CPU loops (max_pool2x2.cpp), compiled once per instruction set: the .cpp
// includes this header in the UNET_CPU_ISA namespace under that set's #pragma GCC target.
#ifndef UNET_CPU_ISA
#error "define UNET_CPU_ISA before including max_pool2x2_kernel.h"
#endif

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "../max_pool2x2.h"

namespace unet_ext {
namespace max_pool {
namespace UNET_CPU_ISA {

// About 64K input elements per task.
int64_t grain(int64_t elements_per_item) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, elements_per_item));
}

// How the kernels hold a dtype: `storage` in memory, compared as `acc`. bfloat16 as its bits
// (uint16_t), widened by a shift: through c10::BFloat16's conversions GCC kept every loop below
// scalar (the channels_last backward took 12.6 ms at 2x32x312x312 against float32's 0.87 ms;
// now 0.9 ms).
template <typename scalar_t>
struct Elem {
  using storage = scalar_t;
  using acc = at::opmath_type<scalar_t>;
  static acc load(storage v) { return static_cast<acc>(v); }
  static storage store(acc v) { return static_cast<storage>(v); }
};

template <>
struct Elem<c10::BFloat16> {
  using storage = uint16_t;
  using acc = float;
  static float load(uint16_t bits) {
    const uint32_t widened = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &widened, sizeof(f));
    return f;
  }
  // Exact for the values load() gives (a maximum is one of them), NaN payloads included.
  static uint16_t store(float v) {
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof(bits));
    return static_cast<uint16_t>(bits >> 16);
  }
};

template <typename scalar_t>
using storage_t = typename Elem<scalar_t>::storage;

template <typename scalar_t>
Takes takes_of(storage_t<scalar_t> v00, storage_t<scalar_t> v01, storage_t<scalar_t> v10, storage_t<scalar_t> v11) {
  using E = Elem<scalar_t>;
  return window_takes<typename E::acc>(E::load(v00), E::load(v01), E::load(v10), E::load(v11));
}

// The window's maximum as stored (max_pool2x2.h's window_max, in acc).
template <typename scalar_t>
storage_t<scalar_t> max_of(storage_t<scalar_t> v00, storage_t<scalar_t> v01, storage_t<scalar_t> v10,
                           storage_t<scalar_t> v11) {
  using E = Elem<scalar_t>;
  return E::store(window_max<typename E::acc>(E::load(v00), E::load(v01), E::load(v10), E::load(v11)));
}

template <typename scalar_t, typename T = storage_t<scalar_t>>
void forward_nchw(const Geometry& g, const T* in, T* out) {
  const int64_t rows = g.batch * g.channels * g.out_h;
  at::parallel_for(0, rows, grain(2 * g.in_w), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t plane = r / g.out_h, oh = r % g.out_h;
      const T* top = in + (plane * g.in_h + 2 * oh) * g.in_w;
      const T* bottom = top + g.in_w;
      T* dst = out + r * g.out_w;
      for (int64_t ow = 0; ow < g.out_w; ++ow) {
        dst[ow] = max_of<scalar_t>(top[2 * ow], top[2 * ow + 1], bottom[2 * ow], bottom[2 * ow + 1]);
      }
    }
  });
}

// One channels_last window's C channels. restrict (the output never overlaps the input): without
// it GCC keeps the loop scalar, 6x slower in bf16 (80 ms against 14 ms for NCHW at 64x568x568).
template <typename scalar_t, typename T = storage_t<scalar_t>>
void forward_channels(int64_t C, const T* __restrict__ v00, const T* __restrict__ v01,
                      const T* __restrict__ v10, const T* __restrict__ v11, T* __restrict__ o) {
  for (int64_t c = 0; c < C; ++c) {
    o[c] = max_of<scalar_t>(v00[c], v01[c], v10[c], v11[c]);
  }
}

template <typename scalar_t, typename T = storage_t<scalar_t>>
void forward_nhwc(const Geometry& g, const T* in, T* out) {
  const int64_t C = g.channels, row = g.in_w * C;
  at::parallel_for(0, g.batch * g.out_h, grain(2 * row), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / g.out_h, oh = r % g.out_h;
      const T* top = in + (n * g.in_h + 2 * oh) * row;
      T* dst = out + r * g.out_w * C;
      for (int64_t ow = 0; ow < g.out_w; ++ow) {
        const T* p00 = top + 2 * ow * C;
        const T* p01 = p00 + C;
        const T* p10 = p00 + row;
        const T* p11 = p10 + C;
        forward_channels<scalar_t>(C, p00, p01, p10, p11, dst + ow * C);
      }
    }
  });
}

// Gradient of one window: g at the argmax (the last element that takes over), 0 at the others,
// handed down from v11 to v00 as "what is left" so that each store is one select: a form GCC
// vectorises over channels (branches on random data would mispredict).
// T(0) is +0.0 for every dtype, bfloat16's bits included.
template <typename T>
inline void scatter_window(T g_val, Takes t, T* d00, T* d01, T* d10, T* d11) {
  const T zero(0);
  *d11 = t.v11 ? g_val : zero;
  const T left11 = t.v11 ? zero : g_val;
  *d10 = t.v10 ? left11 : zero;
  const T left10 = t.v10 ? zero : left11;
  *d01 = t.v01 ? left10 : zero;
  *d00 = t.v01 ? zero : left10;
}

template <typename scalar_t, typename T = storage_t<scalar_t>>
void backward_nchw(const Geometry& g, const T* grad_out, const T* in, T* grad_in) {
  const int64_t planes = g.batch * g.channels;
  // One item = one input row pair (or the odd last row) of one plane.
  const int64_t pairs = (g.in_h + 1) / 2;
  at::parallel_for(0, planes * pairs, grain(2 * g.in_w), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t plane = i / pairs, oh = i % pairs;
      T* d_top = grad_in + (plane * g.in_h + 2 * oh) * g.in_w;
      if (oh == g.out_h) {  // the odd last row: no window reads it
        std::fill(d_top, d_top + g.in_w, T(0));
        continue;
      }
      const T* top = in + (plane * g.in_h + 2 * oh) * g.in_w;
      const T* bottom = top + g.in_w;
      T* d_bottom = d_top + g.in_w;
      const T* go = grad_out + (plane * g.out_h + oh) * g.out_w;
      for (int64_t ow = 0; ow < g.out_w; ++ow) {
        const Takes takes = takes_of<scalar_t>(top[2 * ow], top[2 * ow + 1], bottom[2 * ow], bottom[2 * ow + 1]);
        scatter_window(go[ow], takes, d_top + 2 * ow, d_top + 2 * ow + 1, d_bottom + 2 * ow, d_bottom + 2 * ow + 1);
      }
      if (g.in_w % 2 == 1) d_top[g.in_w - 1] = d_bottom[g.in_w - 1] = T(0);
    }
  });
}

// One channels_last window's C channels. restrict (the four pixels never overlap) and the
// pointers as parameters let GCC vectorise the loop over channels.
template <typename scalar_t, typename T = storage_t<scalar_t>>
void backward_channels(int64_t C, const T* __restrict__ v00, const T* __restrict__ v01,
                       const T* __restrict__ v10, const T* __restrict__ v11, const T* __restrict__ grad,
                       T* __restrict__ d00, T* __restrict__ d01, T* __restrict__ d10, T* __restrict__ d11) {
  for (int64_t c = 0; c < C; ++c) {
    const Takes takes = takes_of<scalar_t>(v00[c], v01[c], v10[c], v11[c]);
    scatter_window(grad[c], takes, d00 + c, d01 + c, d10 + c, d11 + c);
  }
}

template <typename scalar_t, typename T = storage_t<scalar_t>>
void backward_nhwc(const Geometry& g, const T* grad_out, const T* in, T* grad_in) {
  const int64_t C = g.channels, row = g.in_w * C;
  const int64_t pairs = (g.in_h + 1) / 2;
  at::parallel_for(0, g.batch * pairs, grain(2 * row), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / pairs, oh = i % pairs;
      T* d_top = grad_in + (n * g.in_h + 2 * oh) * row;
      if (oh == g.out_h) {
        std::fill(d_top, d_top + row, T(0));
        continue;
      }
      const T* top = in + (n * g.in_h + 2 * oh) * row;
      const T* go = grad_out + (n * g.out_h + oh) * g.out_w * C;
      for (int64_t ow = 0; ow < g.out_w; ++ow) {
        const int64_t at = 2 * ow * C;
        backward_channels<scalar_t>(C, top + at, top + at + C, top + at + row, top + at + row + C, go + ow * C,
                          d_top + at, d_top + at + C, d_top + at + row, d_top + at + row + C);
      }
      if (g.in_w % 2 == 1) {
        std::fill(d_top + (g.in_w - 1) * C, d_top + row, T(0));
        std::fill(d_top + row + (g.in_w - 1) * C, d_top + 2 * row, T(0));
      }
    }
  });
}

}  // namespace UNET_CPU_ISA
}  // namespace max_pool
}  // namespace unet_ext
