// conv_transpose2x2 on the CPU: the 2x2 stride-2 up-conv as one GEMM per block of input rows,
// Y[(co, dy, dx), p] = sum_ci W[ci, co, dy, dx] * x[ci, p], whose epilogue adds the bias and
// scatters each column into its 2x2 output pixels while Y is in cache. Backward gathers the
// 2x2 gradient of each input pixel into G[(co, dy, dx), p]: dgrad = W G, wgrad = sum x G^T
// (per-part partials, one part per thread, added in order), grad_bias = row sums of G. Kernels
// read NCHW; channels_last inputs are converted and the results returned channels_last.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>

#include "../common/dispatch.h"
#include "../conv_host.h"
#include "conv2d_kernel.h"
#include "cpu_isa.h"
#include "gemm.h"
#include "huge_pages.h"
#include "partials.h"

namespace unet_ext {
namespace conv {
namespace {

using cpu::empty_huge;

constexpr const char* kOp = "unet_ext.conv_transpose2x2";

// Input rows per block: the block's input and its 4*C_out product stay near 1 MiB.
int64_t rows_per_block(const ConvGeometry& g, int64_t element_size) {
  const int64_t per_pixel = (g.in_channels + 4 * g.out_channels) * element_size;
  const int64_t pixels = std::max<int64_t>(64, (int64_t{1} << 20) / std::max<int64_t>(1, per_pixel));
  return std::clamp<int64_t>(pixels / std::max<int64_t>(1, g.in_w), 1, std::max<int64_t>(1, g.in_h));
}

// x[ci, (r, w)] of image n, rows [h0, h0 + rows), as opmath.
template <typename scalar_t, typename acc_t>
void load_input_block(const ConvGeometry& g, const scalar_t* input, int64_t n, int64_t h0,
                      int64_t pixels, acc_t* dst) {
  const int64_t plane = g.in_h * g.in_w;
  for (int64_t ci = 0; ci < g.in_channels; ++ci) {
    const scalar_t* src = input + (n * g.in_channels + ci) * plane + h0 * g.in_w;
    acc_t* d = dst + ci * pixels;
    for (int64_t i = 0; i < pixels; ++i) d[i] = static_cast<acc_t>(src[i]);
  }
}

template <typename scalar_t>
void forward_kernel(const ConvGeometry& g, const scalar_t* input, const at::Tensor& weight_rows,
                    const at::Tensor& bias, scalar_t* output) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = rows_per_block(g, sizeof(acc_t));
  const int64_t blocks_per_image = (g.in_h + rows - 1) / rows;
  const int64_t out_plane = g.out_h * g.out_w;
  const acc_t* bias_data = bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr;
  const acc_t* weights = weight_rows.const_data_ptr<acc_t>();
  at::parallel_for(0, g.batch * blocks_per_image, 1, [&](int64_t b0, int64_t b1) {
    std::unique_ptr<acc_t[]> x(new acc_t[g.in_channels * rows * g.in_w]);
    std::unique_ptr<acc_t[]> y(new acc_t[4 * g.out_channels * rows * g.in_w]);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b / blocks_per_image, h0 = (b % blocks_per_image) * rows;
      const int64_t block_rows = std::min(rows, g.in_h - h0), pixels = block_rows * g.in_w;
      load_input_block(g, input, n, h0, pixels, x.get());
      // y[(co, dy, dx), pixels] = W^T[4 C_out, C_in] x[C_in, pixels]
      cpu::gemm(4 * g.out_channels, pixels, g.in_channels, weights, g.in_channels, x.get(), pixels,
                y.get(), pixels, false);
      const acc_t* p = y.get();
      for (int64_t co = 0; co < g.out_channels; ++co) {
        const acc_t shift = bias_data ? bias_data[co] : acc_t(0);
        scalar_t* plane = output + (n * g.out_channels + co) * out_plane;
        for (int64_t dy = 0; dy < 2; ++dy) {
          const acc_t* even = p + up_phase(co, dy, 0) * pixels;  // dx = 0
          const acc_t* odd = p + up_phase(co, dy, 1) * pixels;   // dx = 1
          for (int64_t r = 0; r < block_rows; ++r) {
            scalar_t* out_row = plane + (2 * (h0 + r) + dy) * g.out_w;
            const acc_t* e = even + r * g.in_w;
            const acc_t* o = odd + r * g.in_w;
            for (int64_t w = 0; w < g.in_w; ++w) {
              out_row[2 * w] = static_cast<scalar_t>(e[w] + shift);
              out_row[2 * w + 1] = static_cast<scalar_t>(o[w] + shift);
            }
          }
        }
      }
    }
    cpu::gemm_release();
  });
}

template <typename scalar_t>
void backward_kernel(const ConvGeometry& g, const scalar_t* grad_out, const scalar_t* input,
                     const at::Tensor& weight_matrix, scalar_t* grad_input,
                     at::Tensor& grad_weight, at::Tensor& grad_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = rows_per_block(g, sizeof(acc_t));
  const int64_t blocks_per_image = (g.in_h + rows - 1) / rows;
  const int64_t out_plane = g.out_h * g.out_w, in_plane = g.in_h * g.in_w;
  const bool want_weight = grad_weight.defined();
  // One partial per part (partials.h), whatever the size of the team that runs the parts.
  const int64_t blocks = g.batch * blocks_per_image, parts = cpu::partial_count(blocks);
  const auto acc_options = weight_matrix.options();
  at::Tensor weight_partials, bias_partials;
  if (want_weight) {
    weight_partials = at::zeros({parts, g.in_channels, 4 * g.out_channels}, acc_options);
    bias_partials = at::zeros({parts, g.out_channels}, acc_options);
  }
  const acc_t* weights = weight_matrix.const_data_ptr<acc_t>();
  const int64_t phases = 4 * g.out_channels;
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    const int64_t max_pixels = rows * g.in_w;
    // G[(co, dy, dx), pixel]: each input pixel's 2x2 output gradient, for dgrad = W G; its
    // transpose G^T[pixel, (co, dy, dx)] for wgrad = x G^T (both plain GEMM operands).
    std::unique_ptr<acc_t[]> gathered(new acc_t[phases * max_pixels]);
    std::unique_ptr<acc_t[]> gathered_t(want_weight ? new acc_t[max_pixels * phases] : nullptr);
    std::unique_ptr<acc_t[]> x(want_weight ? new acc_t[g.in_channels * max_pixels] : nullptr);
    std::unique_ptr<acc_t[]> dx(grad_input ? new acc_t[g.in_channels * max_pixels] : nullptr);
    for (int64_t part = p0; part < p1; ++part) {
      acc_t* weight_sum = want_weight ? weight_partials[part].mutable_data_ptr<acc_t>() : nullptr;
      acc_t* bias_sum = want_weight ? bias_partials[part].mutable_data_ptr<acc_t>() : nullptr;
      const int64_t b1 = cpu::part_begin(blocks, parts, part + 1);
      for (int64_t b = cpu::part_begin(blocks, parts, part); b < b1; ++b) {
        const int64_t n = b / blocks_per_image, h0 = (b % blocks_per_image) * rows;
        const int64_t block_rows = std::min(rows, g.in_h - h0), pixels = block_rows * g.in_w;
        acc_t* G = gathered.get();
        acc_t* GT = gathered_t.get();
        for (int64_t co = 0; co < g.out_channels; ++co) {
          const scalar_t* plane = grad_out + (n * g.out_channels + co) * out_plane;
          acc_t lanes[cpu_kernel::kBiasLanes] = {};  // the bias sum over the gathered phases (conv2d_kernel.h)
          for (int64_t dy = 0; dy < 2; ++dy) {
            acc_t* even = G + up_phase(co, dy, 0) * pixels;
            acc_t* odd = G + up_phase(co, dy, 1) * pixels;
            for (int64_t r = 0; r < block_rows; ++r) {
              const scalar_t* row = plane + (2 * (h0 + r) + dy) * g.out_w;
              for (int64_t w = 0; w < g.in_w; ++w) {
                even[r * g.in_w + w] = static_cast<acc_t>(row[2 * w]);
                odd[r * g.in_w + w] = static_cast<acc_t>(row[2 * w + 1]);
              }
            }
            if (!bias_sum) continue;
            cpu_kernel::add_bias_lanes(lanes, pixels, [even, odd](int64_t i) { return even[i] + odd[i]; });
          }
          if (bias_sum) bias_sum[co] += cpu_kernel::bias_lanes_sum(lanes);
        }
        if (GT) cpu::transpose(G, phases, pixels, GT);
        if (grad_input) {
          // dx[C_in, pixels] = W[C_in, 4 C_out] G[4 C_out, pixels]
          cpu::gemm(g.in_channels, pixels, phases, weights, phases, G, pixels, dx.get(), pixels, false);
          for (int64_t ci = 0; ci < g.in_channels; ++ci) {
            scalar_t* dst = grad_input + (n * g.in_channels + ci) * in_plane + h0 * g.in_w;
            const acc_t* src = dx.get() + ci * pixels;
            for (int64_t i = 0; i < pixels; ++i) dst[i] = static_cast<scalar_t>(src[i]);
          }
        }
        if (want_weight) {
          load_input_block(g, input, n, h0, pixels, x.get());
          // weight_sum[C_in, 4 C_out] += x[C_in, pixels] G^T[pixels, 4 C_out]
          cpu::gemm(g.in_channels, phases, pixels, x.get(), pixels, GT, phases, weight_sum, phases, true);
        }
      }
    }
    cpu::gemm_release();
  });
  if (want_weight) {
    grad_weight.copy_(weight_partials.sum(0));
    grad_bias.copy_(bias_partials.sum(0));
  }
}

// The deep up-convs (512 input channels and more) in float32: oneDNN's deconvolution, as stock
// PyTorch's, which runs near the FMA peak where our per-block GEMMs stream the large weights
// (1024 -> 512 at 28x28: forward+backward 0.71x of stock on ours). The rest stays ours.
// bfloat16: oneDNN's from the same input-channel threshold as the convolutions (conv2d_kernel.h,
// use_onednn, bf16_onednn_channels), for the same reason.
constexpr int64_t kOneDnnChannels = 512;
bool use_onednn(const ConvGeometry& g, at::ScalarType dtype) {
  if (g.batch * g.in_h * g.in_w == 0 || !at::hasMKLDNN() || !at::globalContext().userEnabledMkldnn()) return false;
  if (dtype == at::kBFloat16) return cpu::has_bf16_dot_products() && g.in_channels >= cpu_kernel::bf16_onednn_channels();
  return dtype == at::kFloat && g.in_channels >= kOneDnnChannels;
}

at::Tensor conv_transpose2x2_cpu(const at::Tensor& input_arg, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias) {
  // The GEMMs below run on tensors that may require grad: keep autograd out of them.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const ConvGeometry g = conv_transpose2x2_geometry(kOp, input_arg, weight, bias);
  const auto format = conv_output_format(input_arg, weight);
  if (use_onednn(g, input_arg.scalar_type())) {
    return at::conv_transpose2d(input_arg, weight, bias, {2, 2}).contiguous(format);
  }
  at::Tensor output = empty_huge({g.batch, g.out_channels, g.out_h, g.out_w}, input_arg.options());
  if (output.numel() > 0) {
    const at::Tensor input = input_arg.contiguous();
    // Rows (co, dy, dx) of W^T: weight (C_in, C_out, 2, 2) -> [C_out * 4, C_in].
    const at::Tensor w = opmath_contiguous(weight);
    at::Tensor weight_rows = at::empty({4 * g.out_channels, g.in_channels}, w.options());
    AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "up_weight_rows", [&] {
      cpu::transpose(w.const_data_ptr<scalar_t>(), g.in_channels, 4 * g.out_channels,
                     weight_rows.mutable_data_ptr<scalar_t>());  // tiled, parallel: 8 MB at 1024 -> 512
    });
    const at::Tensor bias_acc = bias.has_value() && bias->defined() ? opmath_contiguous(*bias) : at::Tensor();
    if (g.in_channels == 0) {
      output.copy_(bias_acc.defined() ? bias_acc.view({1, -1, 1, 1}).expand_as(output) : at::zeros_like(output));
    } else {
      UNET_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv_transpose2x2_cpu", [&] {
        forward_kernel<scalar_t>(g, input.const_data_ptr<scalar_t>(), weight_rows, bias_acc,
                                 output.mutable_data_ptr<scalar_t>());
      });
    }
  }
  return format == at::MemoryFormat::ChannelsLast ? output.contiguous(format) : output;
}

// The bf16 channels_last backward on oneDNN's side as two GEMMs (at::mm: oneDNN's bf16 matmul,
// float32 accumulation). The 2x2 stride-2 windows do not overlap, so with grad_out's 2x2 output
// blocks as rows G[n h w][dy dx co] and the weight as W[ci][dy dx co] (its channels_last order, a
// view when the weight is channels_last, as bf16 autocast casts it), grad_input = G W^T and
// grad_weight = X^T G, each one GEMM of the forward's size. oneDNN's deconvolution backward took
// 1.6-2.4x as long (64 -> 32 channels at 68x68, batch 2: 3.2 against 1.4 ms; 512 -> 256 at 12x12:
// 2.7 against 1.7 ms).
std::tuple<at::Tensor, at::Tensor, at::Tensor> gemm_backward(const ConvGeometry& g, const at::Tensor& grad_out_arg,
                                                             const at::Tensor& input_arg, const at::Tensor& weight,
                                                             std::array<bool, 3> output_mask) {
  constexpr auto kLast = at::MemoryFormat::ChannelsLast;
  const int64_t n = g.batch, h = g.in_h, w = g.in_w, ci = g.in_channels, co = g.out_channels, pixels = n * h * w;
  const auto options = input_arg.options();
  const at::Tensor grad_out = grad_out_arg.to(input_arg.scalar_type()).contiguous(kLast);
  at::Tensor grad_input = at::empty({0}, options);
  at::Tensor grad_weight = at::empty({0}, weight.options()), grad_bias = at::empty({0}, weight.options());
  if (output_mask[0] || output_mask[1]) {
    at::Tensor rows = empty_huge({pixels, 4 * co}, options);  // G
    rows.view({n, h, w, 2, 2, co}).copy_(grad_out.permute({0, 2, 3, 1}).view({n, h, 2, w, 2, co}).permute({0, 1, 3, 2, 4, 5}));
    if (output_mask[0]) {
      const at::Tensor weight_rows = weight.permute({0, 2, 3, 1}).reshape({ci, 4 * co});
      grad_input = empty_huge({n, ci, h, w}, options, kLast);
      at::Tensor grad_input_rows = grad_input.permute({0, 2, 3, 1}).view({pixels, ci});  // grad_input's memory
      at::mm_out(grad_input_rows, rows, weight_rows.t());
    }
    if (output_mask[1]) {
      const at::Tensor input_rows = input_arg.contiguous(kLast).permute({0, 2, 3, 1}).reshape({pixels, ci});
      grad_weight = at::mm(input_rows.t(), rows).view({ci, 2, 2, co}).permute({0, 3, 1, 2})
                        .contiguous(weight.suggest_memory_format());
    }
  }
  if (output_mask[2]) grad_bias = grad_out.sum({0, 2, 3}, false, at::kFloat).to(weight.scalar_type());
  return {grad_input, grad_weight, grad_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_transpose2x2_backward_cpu(
    const at::Tensor& grad_out_arg, const at::Tensor& input_arg, const at::Tensor& weight,
    std::array<bool, 3> output_mask) {
  // The GEMMs below run on tensors that may require grad: keep autograd out of them.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  constexpr const char* op = "unet_ext._conv_transpose2x2_backward";
  const ConvGeometry g = conv_transpose2x2_geometry(op, input_arg, weight, std::nullopt);
  const std::vector<int64_t> out_shape{g.batch, g.out_channels, g.out_h, g.out_w};
  TORCH_CHECK(grad_out_arg.sizes().equals(out_shape), op, ": grad_out must have shape ",
              at::IntArrayRef(out_shape), ", got ", grad_out_arg.sizes());
  const auto format = conv_memory_format(input_arg);
  if (use_onednn(g, input_arg.scalar_type()) && g.out_channels > 0) {
    if (input_arg.scalar_type() == at::kBFloat16 && format == at::MemoryFormat::ChannelsLast && g.in_channels > 0) {
      return gemm_backward(g, grad_out_arg, input_arg, weight, output_mask);
    }
    auto [gi, gw, gb] = at::convolution_backward(
        grad_out_arg.to(input_arg.scalar_type()).contiguous(format), input_arg.contiguous(format), weight,
        std::vector<int64_t>{g.out_channels}, {2, 2}, {0, 0}, {1, 1}, true, {0, 0}, 1, output_mask);
    return {output_mask[0] ? gi.contiguous(format) : at::empty({0}, input_arg.options()),
            output_mask[1] ? gw.contiguous(weight.suggest_memory_format()) : at::empty({0}, weight.options()),
            output_mask[2] ? gb : at::empty({0}, weight.options())};
  }
  const at::Tensor input = input_arg.contiguous();
  const at::Tensor grad_out = grad_out_arg.to(input.scalar_type()).contiguous();
  const auto acc_options = input.options().dtype(at::toOpMathType(input.scalar_type()));
  at::Tensor grad_input = at::empty({0}, input.options());
  at::Tensor grad_weight = at::empty({0}, weight.options());
  at::Tensor grad_bias = at::empty({0}, weight.options());
  at::Tensor weight_acc, bias_acc;
  if (output_mask[0]) grad_input = empty_huge(input.sizes(), input.options()).zero_();
  if (output_mask[1] || output_mask[2]) {
    weight_acc = at::zeros({g.in_channels, 4 * g.out_channels}, acc_options);
    bias_acc = at::zeros({g.out_channels}, acc_options);
  }
  if (input.numel() > 0 && g.out_channels > 0 && (output_mask[0] || weight_acc.defined())) {
    const at::Tensor weight_matrix = opmath_contiguous(weight).view({g.in_channels, 4 * g.out_channels});
    UNET_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv_transpose2x2_backward_cpu", [&] {
      backward_kernel<scalar_t>(g, grad_out.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
                                weight_matrix,
                                output_mask[0] ? grad_input.mutable_data_ptr<scalar_t>() : nullptr,
                                weight_acc, bias_acc);
    });
  } else if (bias_acc.defined() && grad_out.numel() > 0) {
    bias_acc.copy_(grad_out.sum({0, 2, 3}, false, bias_acc.scalar_type()));  // C_in = 0
  }
  if (output_mask[0] && format == at::MemoryFormat::ChannelsLast) grad_input = grad_input.contiguous(format);
  if (output_mask[1]) grad_weight = weight_acc.view(weight.sizes()).to(weight.scalar_type()).contiguous(weight.suggest_memory_format());
  if (output_mask[2]) grad_bias = bias_acc.to(weight.scalar_type());
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace
}  // namespace conv
}  // namespace unet_ext

TORCH_LIBRARY_IMPL(unet_ext, CPU, m) {
  m.impl("conv_transpose2x2", &unet_ext::conv::conv_transpose2x2_cpu);
  m.impl("_conv_transpose2x2_backward", &unet_ext::conv::conv_transpose2x2_backward_cpu);
}
