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

// A family of `rows` runs at a fixed pitch: run i starts at dst + i * dst_pitch (and, for a
// copy, src + i * src_pitch). The CPU kernel copies a family with one memcpy when it is dense
// on both sides; runs of the per-run kernels are rows of families.
struct Family {
  int64_t dst, src, src_step, length;
  int64_t rows, dst_pitch, src_pitch;
  int source;

  UNET_HD Run row(int64_t i) const {
    Run run;
    run.dst = dst + i * dst_pitch;
    run.src = src + i * src_pitch;
    run.src_step = src_step;
    run.length = length;
    run.source = source;
    return run;
  }
  // Whether the family is one contiguous block in the destination (and in the source).
  UNET_HD bool dense() const {
    return (rows <= 1 || dst_pitch == length) &&
           (source == kZero || length <= 1 || src_step == 1) &&
           (source == kZero || rows <= 1 || src_pitch == length);
  }
};

UNET_HD Family empty_family(int64_t dst) {
  Family f;
  f.dst = dst;
  f.src = f.src_step = f.length = f.rows = f.dst_pitch = f.src_pitch = 0;
  f.source = kZero;
  return f;
}

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
  // NCHW: a family per (n, c) plane, its rows are image rows. NHWC: a family per (n, h) image
  // row and segment (skip's channels, then up's), its rows are pixels.
  UNET_HD int64_t forward_families() const {
    return channels_last ? batch * height : batch * channels();
  }
  UNET_HD int forward_segments() const { return channels_last ? 2 : 1; }
  UNET_HD Family forward_family(int64_t f, int segment) const {
    Family fam;
    if (channels_last) {  // f = (n, h)
      const int64_t h = f % height, n = f / height;
      fam.rows = width;
      fam.dst_pitch = channels();
      if (segment == 0) {
        fam.dst = f * width * channels();
        fam.src = n * skip.n + (h + top) * skip.h + left * skip.w;
        fam.src_step = skip.c;
        fam.src_pitch = skip.w;
        fam.length = skip_channels;
        fam.source = kSkip;
      } else {
        fam.dst = f * width * channels() + skip_channels;
        fam.src = n * up.n + h * up.h;
        fam.src_step = up.c;
        fam.src_pitch = up.w;
        fam.length = up_channels;
        fam.source = kUp;
      }
    } else {  // f = (n, c)
      const int64_t c = f % channels(), n = f / channels();
      fam.dst = f * height * width;
      fam.rows = height;
      fam.dst_pitch = width;
      fam.length = width;
      if (c < skip_channels) {
        fam.src = n * skip.n + c * skip.c + top * skip.h + left * skip.w;
        fam.src_step = skip.w;
        fam.src_pitch = skip.h;
        fam.source = kSkip;
      } else {
        fam.src = n * up.n + (c - skip_channels) * up.c;
        fam.src_step = up.w;
        fam.src_pitch = up.h;
        fam.source = kUp;
      }
    }
    return fam;
  }
  UNET_HD int64_t forward_rows() const { return channels_last ? width : height; }
  UNET_HD int64_t forward_runs() const { return forward_families() * forward_rows(); }
  // Run r directly (one division chain less than going through its family: the CUDA copy
  // kernels keep to their register budget with it).
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

  // grad_skip as families. NCHW, a (n, c) plane in 5 segments: the zero rows above and
  // below the window (one block each), then the window rows' left margins, copies and right
  // margins. NHWC, a (n, hs) row in 3 segments: zero pixels left of the window (the whole row
  // when hs is outside it), the window's pixels, zero pixels right of it.
  UNET_HD int64_t grad_skip_families() const {
    return channels_last ? batch * skip_height : batch * skip_channels;
  }
  UNET_HD int grad_skip_family_segments() const { return channels_last ? 3 : 5; }
  UNET_HD Family grad_skip_family(int64_t f, int segment) const {
    if (channels_last) {  // f = (n, hs)
      const int64_t hs = f % skip_height, n = f / skip_height;
      const int64_t row = f * skip_width * skip_channels;
      const bool inside = hs >= top && hs < top + height;
      Family fam = empty_family(row);
      fam.rows = 1;
      if (!inside) {
        if (segment == 0) fam.length = skip_width * skip_channels;
        return fam;
      }
      if (segment == 0) {
        fam.length = left * skip_channels;
      } else if (segment == 2) {
        fam.dst = row + (left + width) * skip_channels;
        fam.length = (skip_width - left - width) * skip_channels;
      } else {
        fam.dst = row + left * skip_channels;
        fam.rows = width;
        fam.dst_pitch = skip_channels;
        fam.length = skip_channels;
        fam.src = n * grad.n + (hs - top) * grad.h;
        fam.src_step = grad.c;
        fam.src_pitch = grad.w;
        fam.source = kGrad;
      }
      return fam;
    }
    const int64_t c = f % skip_channels, n = f / skip_channels;  // f = (n, c)
    const int64_t plane = f * skip_height * skip_width;
    Family fam = empty_family(plane);
    fam.rows = 1;
    switch (segment) {
      case 0:  // rows [0, top)
        fam.length = top * skip_width;
        break;
      case 1:  // rows [top + H, Hs)
        fam.dst = plane + (top + height) * skip_width;
        fam.length = (skip_height - top - height) * skip_width;
        break;
      default: {  // window rows: 2 left margin, 3 copy, 4 right margin
        fam.rows = height;
        fam.dst_pitch = skip_width;
        const int64_t first_row = plane + top * skip_width;
        if (segment == 2) {
          fam.dst = first_row;
          fam.length = left;
        } else if (segment == 4) {
          fam.dst = first_row + left + width;
          fam.length = skip_width - left - width;
        } else {
          fam.dst = first_row + left;
          fam.length = width;
          fam.src = n * grad.n + c * grad.c;
          fam.src_step = grad.w;
          fam.src_pitch = grad.h;
          fam.source = kGrad;
        }
      }
    }
    return fam;
  }

  // ---- backward, grad_up (N, Cu, H, W): the trailing channels of grad ----
  // NCHW: a family per (n, c) plane; NHWC: per (n, h) row, its rows are pixels.
  UNET_HD int64_t grad_up_families() const {
    return channels_last ? batch * height : batch * up_channels;
  }
  UNET_HD Family grad_up_family(int64_t f) const {
    Family fam;
    fam.source = kGrad;
    if (channels_last) {  // f = (n, h)
      const int64_t h = f % height, n = f / height;
      fam.dst = f * width * up_channels;
      fam.rows = width;
      fam.dst_pitch = up_channels;
      fam.length = up_channels;
      fam.src = n * grad.n + skip_channels * grad.c + h * grad.h;
      fam.src_step = grad.c;
      fam.src_pitch = grad.w;
    } else {  // f = (n, c)
      const int64_t c = f % up_channels, n = f / up_channels;
      fam.dst = f * height * width;
      fam.rows = height;
      fam.dst_pitch = width;
      fam.length = width;
      fam.src = n * grad.n + (skip_channels + c) * grad.c;
      fam.src_step = grad.w;
      fam.src_pitch = grad.h;
    }
    return fam;
  }
  UNET_HD int64_t grad_up_rows() const { return channels_last ? width : height; }
  UNET_HD int64_t grad_up_runs() const { return grad_up_families() * grad_up_rows(); }
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
