// conv2d_relu / conv2d_bias on the CPU: blocked implicit GEMM. Each task takes a block of output
// rows of one image, gathers its im2col matrix [C_in*kh*kw, rows*W_out] into a per-thread
// workspace (opmath dtype, sized for L2), multiplies it with ATen's BLAS and applies
// bias + ReLU (+ the cast) while the block is in cache. No activation-sized temporary.
// Backward: dgrad is the same convolution of the masked gradient (mask = output > 0, applied
// while gathering) with the flipped weight; wgrad and the bias grad accumulate per thread over
// the same blocks and are summed in a fixed order. Kernels read NCHW; channels_last inputs are
// converted and the results returned channels_last.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "../common/dispatch.h"
#include "../conv_host.h"
#include "gemm.h"

namespace unet_ext {
namespace conv {
namespace {

// Output rows per block: the im2col block stays near kBlockBytes (half of a 1 MiB L2), with at
// least one row.
constexpr int64_t kBlockBytes = int64_t{1} << 19;
int64_t rows_per_block(const ConvGeometry& g, int64_t element_size) {
  const int64_t target_pixels = std::max<int64_t>(64, kBlockBytes / (g.taps() * element_size));
  return std::clamp<int64_t>(target_pixels / std::max<int64_t>(1, g.out_w), 1, std::max<int64_t>(1, g.out_h));
}

// col[(ci, ky, kx), (r, ow)] = src[ci, oh0 + r + ky - pad, ow + kx - pad], 0 outside the
// input; with a mask, only where mask > 0 (the ReLU's derivative, for dgrad/wgrad).
template <typename scalar_t, typename acc_t>
void gather_columns(const ConvGeometry& g, const scalar_t* src, const scalar_t* mask,
                    int64_t oh0, int64_t rows, acc_t* col) {
  const int64_t pixels = rows * g.out_w;
  for (int64_t ci = 0; ci < g.in_channels; ++ci) {
    for (int64_t ky = 0; ky < g.kernel_h; ++ky) {
      for (int64_t kx = 0; kx < g.kernel_w; ++kx) {
        acc_t* dst = col + ((ci * g.kernel_h + ky) * g.kernel_w + kx) * pixels;
        const int64_t lo = g.first_valid_col(kx), hi = g.last_valid_col(kx);
        for (int64_t r = 0; r < rows; ++r) {
          acc_t* d = dst + r * g.out_w;
          const int64_t ih = g.input_row(oh0 + r, ky);
          if (ih < 0 || ih >= g.in_h) {
            std::fill(d, d + g.out_w, acc_t(0));
            continue;
          }
          const int64_t offset = (ci * g.in_h + ih) * g.in_w + kx - g.pad_w;
          const scalar_t* s = src + offset;
          std::fill(d, d + lo, acc_t(0));
          if (mask) {
            const scalar_t* m = mask + offset;
            for (int64_t ow = lo; ow < hi; ++ow) {
              const acc_t v = static_cast<acc_t>(s[ow]);
              d[ow] = static_cast<acc_t>(m[ow]) > acc_t(0) ? v : acc_t(0);
            }
          } else {
            for (int64_t ow = lo; ow < hi; ++ow) d[ow] = static_cast<acc_t>(s[ow]);
          }
          std::fill(d + hi, d + g.out_w, acc_t(0));
        }
      }
    }
  }
}

// dst (N, C_out, H_out, W_out) contiguous = [relu](conv(src [masked], weight_matrix) + bias).
// weight_matrix: [C_out, C_in*kh*kw] in opmath dtype.
template <typename scalar_t>
void convolve(const ConvGeometry& g, const scalar_t* src, const scalar_t* mask,
              const at::Tensor& weight_matrix, const at::Tensor& bias, bool relu, scalar_t* dst) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = rows_per_block(g, sizeof(acc_t));
  const int64_t blocks_per_image = (g.out_h + rows - 1) / rows;
  const int64_t src_image = g.in_channels * g.in_h * g.in_w;
  const int64_t dst_image = g.out_channels * g.out_h * g.out_w;
  const int64_t dst_plane = g.out_h * g.out_w;
  const acc_t* bias_data = bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr;
  const acc_t* weights = weight_matrix.const_data_ptr<acc_t>();
  at::parallel_for(0, g.batch * blocks_per_image, 1, [&](int64_t b0, int64_t b1) {
    std::unique_ptr<acc_t[]> col(new acc_t[g.taps() * rows * g.out_w]);
    std::unique_ptr<acc_t[]> product(new acc_t[g.out_channels * rows * g.out_w]);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b / blocks_per_image, oh0 = (b % blocks_per_image) * rows;
      const int64_t block_rows = std::min(rows, g.out_h - oh0), pixels = block_rows * g.out_w;
      gather_columns(g, src + n * src_image, mask ? mask + n * src_image : nullptr, oh0,
                     block_rows, col.get());
      // product[C_out, pixels] = W[C_out, taps] col[taps, pixels]
      cpu::gemm(g.out_channels, pixels, g.taps(), weights, g.taps(), col.get(), pixels,
                product.get(), pixels, false);
      const acc_t* p = product.get();
      scalar_t* d = dst + n * dst_image + oh0 * g.out_w;
      for (int64_t co = 0; co < g.out_channels; ++co) {
        const acc_t shift = bias_data ? bias_data[co] : acc_t(0);
        const acc_t* row = p + co * pixels;
        scalar_t* out_row = d + co * dst_plane;
        if (relu) {
          // v < 0 ? 0 : v keeps NaN, as torch.relu does.
          for (int64_t i = 0; i < pixels; ++i) {
            const acc_t v = row[i] + shift;
            out_row[i] = static_cast<scalar_t>(v < acc_t(0) ? acc_t(0) : v);
          }
        } else {
          for (int64_t i = 0; i < pixels; ++i) out_row[i] = static_cast<scalar_t>(row[i] + shift);
        }
      }
    }
    cpu::gemm_release();
  });
}

// grad_weight^T [C_in*kh*kw, C_out] and grad_bias [C_out] (opmath) from the input and the
// masked grad_out, block by block; one partial sum per thread, added in thread order.
template <typename scalar_t>
void weight_gradients(const ConvGeometry& g, const scalar_t* input, const scalar_t* grad_out,
                      const scalar_t* mask, at::Tensor& grad_weight_t, at::Tensor& grad_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = rows_per_block(g, sizeof(acc_t));
  const int64_t blocks_per_image = (g.out_h + rows - 1) / rows;
  const int64_t in_image = g.in_channels * g.in_h * g.in_w;
  const int64_t out_plane = g.out_h * g.out_w, out_image = g.out_channels * out_plane;
  const int threads = at::get_num_threads();
  const auto acc_options = grad_weight_t.options();
  at::Tensor weight_partials = at::zeros({threads, g.taps(), g.out_channels}, acc_options);
  at::Tensor bias_partials = at::zeros({threads, g.out_channels}, acc_options);
  at::parallel_for(0, g.batch * blocks_per_image, 1, [&](int64_t b0, int64_t b1) {
    const int thread = at::get_thread_num();
    std::unique_ptr<acc_t[]> col(new acc_t[g.taps() * rows * g.out_w]);
    std::unique_ptr<acc_t[]> masked_t(new acc_t[rows * g.out_w * g.out_channels]);
    acc_t* weight_sum = weight_partials[thread].mutable_data_ptr<acc_t>();
    acc_t* bias_sum = bias_partials[thread].mutable_data_ptr<acc_t>();
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b / blocks_per_image, oh0 = (b % blocks_per_image) * rows;
      const int64_t block_rows = std::min(rows, g.out_h - oh0), pixels = block_rows * g.out_w;
      gather_columns(g, input + n * in_image, static_cast<const scalar_t*>(nullptr), oh0,
                     block_rows, col.get());
      // masked_t[pixel, co]: the block's gradient, ReLU mask applied, transposed for the GEMM.
      acc_t* m = masked_t.get();
      for (int64_t co = 0; co < g.out_channels; ++co) {
        const int64_t offset = n * out_image + co * out_plane + oh0 * g.out_w;
        const scalar_t* gsrc = grad_out + offset;
        const scalar_t* msrc = mask ? mask + offset : nullptr;
        acc_t s = 0;
        for (int64_t i = 0; i < pixels; ++i) {
          const acc_t v = static_cast<acc_t>(gsrc[i]);
          const acc_t kept = msrc && !(static_cast<acc_t>(msrc[i]) > acc_t(0)) ? acc_t(0) : v;
          m[i * g.out_channels + co] = kept;
          s += kept;
        }
        bias_sum[co] += s;
      }
      // weight_sum[taps, C_out] += col[taps, pixels] masked_t[pixels, C_out]
      cpu::gemm(g.taps(), g.out_channels, pixels, col.get(), pixels, m, g.out_channels,
                weight_sum, g.out_channels, true);
    }
    cpu::gemm_release();
  });
  grad_weight_t.copy_(weight_partials.sum(0));
  grad_bias.copy_(bias_partials.sum(0));
}

at::Tensor opmath_contiguous(const at::Tensor& t) {
  return t.to(at::toOpMathType(t.scalar_type())).contiguous();
}

at::Tensor conv2d_forward_cpu(const char* op, const at::Tensor& input_arg, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, int64_t padding, bool relu) {
  // The GEMMs below run on tensors that may require grad: keep autograd out of them.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const ConvGeometry g = conv2d_geometry(op, input_arg, weight, bias, padding);
  const auto format = conv_memory_format(input_arg);
  at::Tensor output = at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, input_arg.options());
  if (output.numel() > 0) {
    const at::Tensor input = input_arg.contiguous();
    const at::Tensor weight_matrix = opmath_contiguous(weight).view({g.out_channels, g.taps()});
    const at::Tensor bias_acc = bias.has_value() && bias->defined() ? opmath_contiguous(*bias) : at::Tensor();
    UNET_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv2d_relu_cpu", [&] {
      convolve<scalar_t>(g, input.const_data_ptr<scalar_t>(), nullptr, weight_matrix, bias_acc,
                         relu, output.mutable_data_ptr<scalar_t>());
    });
  }
  return format == at::MemoryFormat::ChannelsLast ? output.contiguous(format) : output;
}

at::Tensor conv2d_relu_cpu(const at::Tensor& input, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, int64_t padding) {
  return conv2d_forward_cpu("unet_ext.conv2d_relu", input, weight, bias, padding, true);
}

at::Tensor conv2d_bias_cpu(const at::Tensor& input, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, int64_t padding) {
  return conv2d_forward_cpu("unet_ext.conv2d_bias", input, weight, bias, padding, false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_backward_cpu(
    const at::Tensor& grad_out_arg, const at::Tensor& input_arg, const at::Tensor& weight,
    const std::optional<at::Tensor>& output_arg, int64_t padding, std::array<bool, 3> output_mask) {
  // The GEMMs below run on tensors that may require grad: keep autograd out of them.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  constexpr const char* op = "unet_ext._conv2d_backward";
  const ConvGeometry g = conv2d_geometry(op, input_arg, weight, std::nullopt, padding);
  const std::vector<int64_t> out_shape{g.batch, g.out_channels, g.out_h, g.out_w};
  TORCH_CHECK(grad_out_arg.sizes().equals(out_shape), op, ": grad_out must have shape ",
              at::IntArrayRef(out_shape), ", got ", grad_out_arg.sizes());
  const bool masked = output_arg.has_value() && output_arg->defined();
  if (masked) {
    TORCH_CHECK(output_arg->sizes().equals(out_shape), op, ": output must have shape ",
                at::IntArrayRef(out_shape), ", got ", output_arg->sizes());
  }
  const auto format = conv_memory_format(input_arg);
  const at::Tensor input = input_arg.contiguous();
  const at::Tensor grad_out = grad_out_arg.to(input.scalar_type()).contiguous();
  const at::Tensor output = masked ? output_arg->to(input.scalar_type()).contiguous() : at::Tensor();
  const auto acc_options = input.options().dtype(at::toOpMathType(input.scalar_type()));

  at::Tensor grad_input = at::empty({0}, input.options());
  at::Tensor grad_weight = at::empty({0}, weight.options());
  at::Tensor grad_bias = at::empty({0}, weight.options());
  if (output_mask[0]) {
    // Every element is written by the dgrad convolution, unless grad_out is empty (C_out = 0).
    grad_input = grad_out.numel() > 0 ? at::empty(input.sizes(), input.options())
                                      : at::zeros(input.sizes(), input.options());
    if (grad_input.numel() > 0 && grad_out.numel() > 0) {
      // W'[ci, (co, ky, kx)] = W[co, ci, kh-1-ky, kw-1-kx]
      const at::Tensor flipped = opmath_contiguous(weight.flip({2, 3}).transpose(0, 1))
                                     .view({g.in_channels, g.out_channels * g.kernel_h * g.kernel_w});
      UNET_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv2d_dgrad_cpu", [&] {
        convolve<scalar_t>(dgrad_geometry(g), grad_out.const_data_ptr<scalar_t>(),
                           masked ? output.const_data_ptr<scalar_t>() : nullptr, flipped,
                           at::Tensor(), false, grad_input.mutable_data_ptr<scalar_t>());
      });
    }
    if (format == at::MemoryFormat::ChannelsLast) grad_input = grad_input.contiguous(format);
  }
  if (output_mask[1] || output_mask[2]) {
    at::Tensor weight_acc_t = at::zeros({g.taps(), g.out_channels}, acc_options);
    at::Tensor bias_acc = at::zeros({g.out_channels}, acc_options);
    if (grad_out.numel() > 0) {
      UNET_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv2d_wgrad_cpu", [&] {
        weight_gradients<scalar_t>(g, input.const_data_ptr<scalar_t>(),
                                   grad_out.const_data_ptr<scalar_t>(),
                                   masked ? output.const_data_ptr<scalar_t>() : nullptr,
                                   weight_acc_t, bias_acc);
      });
    }
    if (output_mask[1]) grad_weight = weight_acc_t.t().reshape(weight.sizes()).to(weight.scalar_type()).contiguous(weight.suggest_memory_format());
    if (output_mask[2]) grad_bias = bias_acc.to(weight.scalar_type());
  }
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace
}  // namespace conv
}  // namespace unet_ext

TORCH_LIBRARY_IMPL(unet_ext, CPU, m) {
  m.impl("conv2d_relu", &unet_ext::conv::conv2d_relu_cpu);
  m.impl("conv2d_bias", &unet_ext::conv::conv2d_bias_cpu);
  m.impl("_conv2d_backward", &unet_ext::conv::conv2d_backward_cpu);
}
