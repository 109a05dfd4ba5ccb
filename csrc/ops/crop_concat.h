// crop_concat index math, shared by the CPU and CUDA kernels (torch-free, UNET_HD).
// out = cat([centre_crop(skip, up.shape[-2:]), up], dim=1). The output (and the backward's
// grad_skip / grad_up) is allocated dense in NCHW or NHWC order, so it decomposes into "runs":
// stretches of consecutive destination elements, each copied from one source with a fixed step
// (any strides) or zero-filled. NCHW runs are image rows; NHWC runs are a pixel's channels.
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace unet_ext {
namespace crop_concat {

struct Strides4 {
  int64_t n, c, h, w;
};

// Where a run's data comes from: kSkip/kUp for the forward, kGrad for the backward.
enum Source : int { kZero = 0, kSkip = 1, kUp = 2, kGrad = 3 };

struct Run {
  int64_t dst;       // offset of the first destination element
  int64_t src;       // offset of the first source element (unused for kZero)
  int64_t src_step;  // source stride along the run
  int64_t length;    // number of elements
  int source;        // a Source
};

UNET_HD int64_t centre_crop_offset(int64_t source_size, int64_t target_size) {
  return (source_size - target_size) / 2;
}

struct Geometry {
  int64_t batch, skip_channels, up_channels;
  int64_t skip_height, skip_width;  // skip's (uncropped) spatial size
  int64_t height, width;            // up's spatial size = output spatial size
  int64_t top, left;                // crop offsets into skip
  bool channels_last;               // memory format of every destination tensor
  Strides4 skip, up, grad;          // source strides (elements)

  UNET_HD int64_t channels() const { return skip_channels + up_channels; }

  // ---- forward: out (N, Cs+Cu, H, W) ----
  UNET_HD int64_t forward_runs() const {
    return channels_last ? batch * height * width : batch * channels() * height;
  }
  UNET_HD int forward_segments() const { return channels_last ? 2 : 1; }
  UNET_HD Run forward_run(int64_t r, int segment) const {
    Run run;
    if (channels_last) {  // r = (n, h, w); segment 0: skip channels, 1: up channels
      const int64_t w = r % width, h = (r / width) % height, n = r / (width * height);
      if (segment == 0) {
        run.dst = r * channels();
        run.src = n * skip.n + (h + top) * skip.h + (w + left) * skip.w;
        run.src_step = skip.c;
        run.length = skip_channels;
        run.source = kSkip;
      } else {
        run.dst = r * channels() + skip_channels;
        run.src = n * up.n + h * up.h + w * up.w;
        run.src_step = up.c;
        run.length = up_channels;
        run.source = kUp;
      }
    } else {  // r = (n, c, h): one output row
      const int64_t h = r % height, c = (r / height) % channels(), n = r / (height * channels());
      run.dst = r * width;
      run.length = width;
      if (c < skip_channels) {
        run.src = n * skip.n + c * skip.c + (h + top) * skip.h + left * skip.w;
        run.src_step = skip.w;
        run.source = kSkip;
      } else {
        run.src = n * up.n + (c - skip_channels) * up.c + h * up.h;
        run.src_step = up.w;
        run.source = kUp;
      }
    }
    return run;
  }

  // ---- backward, grad_skip (N, Cs, Hs, Ws): the crop window copied from grad, zeros around ----
  UNET_HD int64_t grad_skip_runs() const {
    return channels_last ? batch * skip_height * skip_width : batch * skip_channels * skip_height;
  }
  UNET_HD int grad_skip_segments() const { return channels_last ? 1 : 3; }
  UNET_HD Run grad_skip_run(int64_t r, int segment) const {
    Run run;
    run.src_step = 0;
    run.src = 0;
    if (channels_last) {  // r = (n, hs, ws)
      const int64_t ws = r % skip_width, hs = (r / skip_width) % skip_height;
      const int64_t n = r / (skip_width * skip_height);
      run.dst = r * skip_channels;
      run.length = skip_channels;
      const bool inside = hs >= top && hs < top + height && ws >= left && ws < left + width;
      run.source = inside ? kGrad : kZero;
      if (inside) {
        run.src = n * grad.n + (hs - top) * grad.h + (ws - left) * grad.w;
        run.src_step = grad.c;
      }
    } else {  // r = (n, c, hs): segments [0, left) zero, [left, left+W) copy, rest zero
      const int64_t hs = r % skip_height, c = (r / skip_height) % skip_channels;
      const int64_t n = r / (skip_height * skip_channels);
      const bool row_inside = hs >= top && hs < top + height;
      const int64_t begin = segment == 0 ? 0 : (segment == 1 ? left : left + width);
      const int64_t end = segment == 0 ? left : (segment == 1 ? left + width : skip_width);
      run.dst = r * skip_width + begin;
      run.length = end - begin;
      run.source = (segment == 1 && row_inside) ? kGrad : kZero;
      if (run.source == kGrad) {
        run.src = n * grad.n + c * grad.c + (hs - top) * grad.h;
        run.src_step = grad.w;
      }
    }
    return run;
  }

  // ---- backward, grad_up (N, Cu, H, W): the trailing channels of grad ----
  UNET_HD int64_t grad_up_runs() const {
    return channels_last ? batch * height * width : batch * up_channels * height;
  }
  UNET_HD Run grad_up_run(int64_t r) const {
    Run run;
    run.source = kGrad;
    if (channels_last) {  // r = (n, h, w)
      const int64_t w = r % width, h = (r / width) % height, n = r / (width * height);
      run.dst = r * up_channels;
      run.src = n * grad.n + skip_channels * grad.c + h * grad.h + w * grad.w;
      run.src_step = grad.c;
      run.length = up_channels;
    } else {  // r = (n, c, h)
      const int64_t h = r % height, c = (r / height) % up_channels, n = r / (height * up_channels);
      run.dst = r * width;
      run.src = n * grad.n + (skip_channels + c) * grad.c + h * grad.h;
      run.src_step = grad.w;
      run.length = width;
    }
    return run;
  }
};

}  // namespace crop_concat
}  // namespace unet_ext
