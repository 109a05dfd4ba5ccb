// crop_concat on the CPU: the output decomposes into families of runs (crop_concat.h), each
// one memcpy when dense on both sides (a plane of a contiguous input), else a memcpy per run
// (unit-stride source) or a strided loop. Parallel over families.
// The copy depends only on the element size, so one instantiation per size serves every dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "../crop_concat_host.h"

namespace unet_ext {
namespace crop_concat {
namespace {

// Contiguous copy in 64-byte pieces with plain vector moves. libc's memcpy/memset switch to
// `rep movsb` / non-temporal stores for large blocks, which run slower here into a freshly
// allocated output (every page faults on first touch) than ordinary stores.
constexpr int64_t kLargeCopy = int64_t{1} << 16;

inline void copy_bytes(char* dst, const char* src, int64_t bytes) {
  if (bytes >= kLargeCopy || bytes < 64) {
    std::memcpy(dst, src, bytes);
    return;
  }
  int64_t i = 0;
  for (; i + 64 <= bytes; i += 64) __builtin_memcpy(dst + i, src + i, 64);
  // The tail as one more (overlapping) 64-byte move: no libc call per short row.
  if (i < bytes) __builtin_memcpy(dst + bytes - 64, src + bytes - 64, 64);
}

inline void zero_bytes(char* dst, int64_t bytes) {
  int64_t i = 0;
  for (; i + 64 <= bytes; i += 64) __builtin_memset(dst + i, 0, 64);
  if (i < bytes) std::memset(dst + i, 0, bytes - i);
}

template <typename word_t>
void copy_run(word_t* dst, const word_t* src, int64_t step, int64_t length) {
  if (step == 1) {
    copy_bytes(reinterpret_cast<char*>(dst), reinterpret_cast<const char*>(src), length * sizeof(word_t));
  } else {
    for (int64_t i = 0; i < length; ++i) dst[i] = src[i * step];
  }
}

// One family: a single memset/memcpy when dense (a whole plane of a contiguous input),
// else run by run.
template <typename word_t>
void execute_family(const Family& f, word_t* dst_base, const word_t* const* sources) {
  if (f.rows <= 0 || f.length <= 0) return;
  word_t* dst = dst_base + f.dst;
  if (f.source == kZero) {
    if (f.dense()) {
      zero_bytes(reinterpret_cast<char*>(dst), f.rows * f.length * sizeof(word_t));
    } else {
      for (int64_t i = 0; i < f.rows; ++i)
        zero_bytes(reinterpret_cast<char*>(dst + i * f.dst_pitch), f.length * sizeof(word_t));
    }
    return;
  }
  const word_t* src = sources[f.source] + f.src;
  if (f.dense()) {
    copy_bytes(reinterpret_cast<char*>(dst), reinterpret_cast<const char*>(src), f.rows * f.length * sizeof(word_t));
  } else {
    for (int64_t i = 0; i < f.rows; ++i)
      copy_run(dst + i * f.dst_pitch, src + i * f.src_pitch, f.src_step, f.length);
  }
}

// Families per parallel task: enough for ~64 KiB of traffic, so small tensors stay on one thread.
int64_t grain_for(int64_t family_elements, int64_t element_size) {
  const int64_t bytes = std::max<int64_t>(1, family_elements * element_size);
  return std::max<int64_t>(1, (int64_t{1} << 16) / bytes);
}

// NCHW family (output plane) of task t: skip and up planes alternate (while both last), so that
// each thread's contiguous range of tasks mixes the strided skip crops with the dense up copies
// instead of one thread taking all of one kind.
inline int64_t interleaved_plane(const Geometry& g, int64_t t) {
  const int64_t channels = g.channels(), n = t / channels, j = t - n * channels;
  const int64_t pairs = std::min(g.skip_channels, g.up_channels);
  int64_t c;
  if (j < 2 * pairs) {
    c = (j & 1) ? g.skip_channels + (j >> 1) : (j >> 1);
  } else {
    c = g.skip_channels > g.up_channels ? j - pairs : j;  // the longer side's remainder
  }
  return n * channels + c;
}

template <typename word_t>
void forward_impl(const Geometry& g, const at::Tensor& skip, const at::Tensor& up, at::Tensor& out) {
  const word_t* sources[4] = {nullptr, static_cast<const word_t*>(skip.const_data_ptr()),
                              static_cast<const word_t*>(up.const_data_ptr()), nullptr};
  word_t* dst = static_cast<word_t*>(out.mutable_data_ptr());
  const int64_t family_elements = out.numel() / std::max<int64_t>(1, g.forward_families());
  at::parallel_for(0, g.forward_families(), grain_for(family_elements, sizeof(word_t)),
                   [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      if (g.channels_last) {
        // Pixel by pixel, the skip run then the up run: the destination row is written in order.
        const Family skip_part = g.forward_family(t, 0), up_part = g.forward_family(t, 1);
        for (int64_t i = 0; i < skip_part.rows; ++i) {
          for (const Family* part : {&skip_part, &up_part}) {
            if (part->length > 0) {
              copy_run(dst + part->dst + i * part->dst_pitch, sources[part->source] + part->src + i * part->src_pitch,
                       part->src_step, part->length);
            }
          }
        }
      } else {
        execute_family(g.forward_family(interleaved_plane(g, t), 0), dst, sources);
      }
    }
  });
}

template <typename word_t>
void backward_impl(const Geometry& g, const at::Tensor& grad, at::Tensor& grad_skip, at::Tensor& grad_up) {
  const word_t* sources[4] = {nullptr, nullptr, nullptr, static_cast<const word_t*>(grad.const_data_ptr())};
  word_t* skip_dst = static_cast<word_t*>(grad_skip.mutable_data_ptr());
  word_t* up_dst = static_cast<word_t*>(grad_up.mutable_data_ptr());
  const int64_t skip_elements = grad_skip.numel() / std::max<int64_t>(1, g.grad_skip_families());
  at::parallel_for(0, g.grad_skip_families(), grain_for(skip_elements, sizeof(word_t)),
                   [&](int64_t b, int64_t e) {
    for (int64_t f = b; f < e; ++f)
      for (int s = 0; s < g.grad_skip_family_segments(); ++s)
        execute_family(g.grad_skip_family(f, s), skip_dst, sources);
  });
  const int64_t up_elements = grad_up.numel() / std::max<int64_t>(1, g.grad_up_families());
  at::parallel_for(0, g.grad_up_families(), grain_for(up_elements, sizeof(word_t)),
                   [&](int64_t b, int64_t e) {
    for (int64_t f = b; f < e; ++f) execute_family(g.grad_up_family(f), up_dst, sources);
  });
}

template <typename word_t>
struct Forward {
  static void run(const Geometry& g, const at::Tensor& skip, const at::Tensor& up, at::Tensor& out) {
    forward_impl<word_t>(g, skip, up, out);
  }
};

template <typename word_t>
struct Backward {
  static void run(const Geometry& g, const at::Tensor& grad, at::Tensor& gs, at::Tensor& gu) {
    backward_impl<word_t>(g, grad, gs, gu);
  }
};

at::Tensor crop_concat_cpu(const at::Tensor& skip, const at::Tensor& up) {
  at::Tensor out;
  const Geometry g = forward_geometry(skip, up, out);
  if (out.numel() > 0) dispatch_element_size<Forward>(skip.element_size(), g, skip, up, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor> crop_concat_backward_cpu(const at::Tensor& grad_out,
                                                            int64_t skip_channels,
                                                            int64_t skip_height,
                                                            int64_t skip_width) {
  at::Tensor grad_skip, grad_up;
  const Geometry g =
      backward_geometry(grad_out, skip_channels, skip_height, skip_width, grad_skip, grad_up);
  if (grad_skip.numel() + grad_up.numel() > 0)
    dispatch_element_size<Backward>(grad_out.element_size(), g, grad_out, grad_skip, grad_up);
  return {grad_skip, grad_up};
}

}  // namespace
}  // namespace crop_concat
}  // namespace unet_ext

TORCH_LIBRARY_IMPL(unet_ext, CPU, m) {
  m.impl("crop_concat", &unet_ext::crop_concat::crop_concat_cpu);
  m.impl("_crop_concat_backward", &unet_ext::crop_concat::crop_concat_backward_cpu);
}
