// conv2d_relu / conv2d_bias and their backward on the CPU: the blocked implicit-GEMM kernels of
// cpu/conv2d_kernel.h on one NCHW source (channels_last inputs are converted and the results
// returned channels_last); float32 deep layers go to oneDNN (use_onednn); float32 3x3 layers with
// enough channels to Winograd F(4x4, 3x3) (cpu/winograd_cpu.h): forward, dgrad and wgrad. bf16
// (with bf16 dot products) goes to oneDNN, except a channels_last backward's weight gradient:
// ours (cpu/conv_wgrad_bf16.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <utility>

#include "conv2d_kernel.h"
#include "conv_wgrad_bf16.h"
#include "conv_wgrad_nonfinite.h"
#include "winograd_cpu.h"

namespace unet_ext {
namespace conv {
namespace {

using namespace cpu_kernel;  // NOLINT: the kernels and their helpers

at::Tensor conv2d_forward_cpu(const char* op, const at::Tensor& input_arg, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, int64_t padding, bool relu) {
  // The GEMMs below run on tensors that may require grad: keep autograd out of them.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const ConvGeometry g = conv2d_geometry(op, input_arg, weight, bias, padding);
  const auto format = conv_output_format(input_arg, weight);
  bool per_call = true;
  if (winograd::use_winograd_forward(g, input_arg.scalar_type(), weight, &per_call)) {
    at::Tensor output = empty_huge({g.batch, g.out_channels, g.out_h, g.out_w}, input_arg.options());
    const at::Tensor input = input_arg.contiguous();
    const at::Tensor bias_acc = bias.has_value() && bias->defined() ? opmath_contiguous(*bias) : at::Tensor();
    const bool few = per_call && winograd::use_few_tiles(g);  // cached filters: the brgemm path
    if (winograd::convolve(g, dense_parts(input.const_data_ptr<float>(), g.in_channels, g.in_h, g.in_w), nullptr,
                           winograd::forward_filter(weight, few, per_call), bias_acc.defined() ? bias_acc.const_data_ptr<float>() : nullptr,
                           relu, dense_parts(output.mutable_data_ptr<float>(), g.out_channels, g.out_h, g.out_w))) {
      return format == at::MemoryFormat::ChannelsLast ? output.contiguous(format) : output;
    }
    // A non-finite value: the direct path below gives stock's NaN and infinities.
  }
  if (use_onednn(g, input_arg.scalar_type()) && g.batch * g.out_h * g.out_w > 0) {
    return onednn_forward(input_arg, weight, bias, padding, relu).contiguous(format);
  }
  at::Tensor output = empty_huge({g.batch, g.out_channels, g.out_h, g.out_w}, input_arg.options());
  if (output.numel() > 0) {
    const at::Tensor input = input_arg.contiguous();
    // As stored ([C_out][C_in*kh*kw]) for the shifted-rows GEMM, else repacked per tap.
    const at::Tensor taps = use_shifted_rows(g) ? opmath_contiguous(weight) : forward_taps(weight);
    const at::Tensor bias_acc = bias.has_value() && bias->defined() ? opmath_contiguous(*bias) : at::Tensor();
    UNET_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv2d_relu_cpu", [&] {
      convolve<scalar_t>(g, dense_parts(input.const_data_ptr<scalar_t>(), g.in_channels, g.in_h, g.in_w),
                         nullptr, taps, bias_acc, relu,
                         dense_parts(output.mutable_data_ptr<scalar_t>(), g.out_channels, g.out_h, g.out_w));
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_backward_direct(
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
  // A one-channel input is both layouts at once: the output gradient's layout decides (writing a
  // channels_last gradient's ReLU mask as NCHW took 15 ms at 2x32x314x314 bf16 against 1 ms).
  const auto format = g.in_channels == 1 ? grad_out_arg.suggest_memory_format() : conv_memory_format(input_arg);
  if (use_onednn(g, input_arg.scalar_type()) && grad_out_arg.numel() > 0 && input_arg.numel() > 0) {
    // Zero where output <= 0 (a NaN output keeps its gradient), then oneDNN's backward. The mask
    // is ReLU's own backward, one vectorised pass (masked_fill(le(0)) takes 20x as long here).
    const at::Tensor grad = grad_out_arg.to(input_arg.scalar_type());
    const at::Tensor masked_grad = masked ? relu_backward(grad, *output_arg, format) : grad;
    const at::Tensor grad_c = masked_grad.contiguous(format), input_c = input_arg.contiguous(format);
    at::Tensor gi, gw, gb;
    if ((output_mask[1] || output_mask[2]) && input_arg.scalar_type() == at::kBFloat16 &&
        format == at::MemoryFormat::ChannelsLast && use_bf16_wgrad(g)) {
      // The weight and bias gradients by ours (conv_wgrad_bf16.h), dgrad by oneDNN.
      if (output_mask[0]) {
        gi = std::get<0>(at::convolution_backward(grad_c, input_c, weight, std::vector<int64_t>{g.out_channels},
                                                  {1, 1}, {padding, padding}, {1, 1}, false, {0, 0}, 1,
                                                  {true, false, false}));
      }
      std::tie(gw, gb) = bf16_weight_gradient(g, grad_c, {Bf16WgradPart{input_c}}, weight, output_mask);
    } else {
      std::tie(gi, gw, gb) = at::convolution_backward(grad_c, input_c, weight, std::vector<int64_t>{g.out_channels},
                                                      {1, 1}, {padding, padding}, {1, 1}, false, {0, 0}, 1, output_mask);
    }
    return {output_mask[0] ? gi.contiguous(format) : at::empty({0}, input_arg.options()),
            output_mask[1] ? gw.contiguous(weight.suggest_memory_format()) : at::empty({0}, weight.options()),
            output_mask[2] ? gb : at::empty({0}, weight.options())};
  }
  const at::Tensor input = input_arg.contiguous();
  const at::Tensor grad_out = grad_out_arg.to(input.scalar_type()).contiguous();
  const at::Tensor output = masked ? output_arg->to(input.scalar_type()).contiguous() : at::Tensor();
  const auto acc_options = input.options().dtype(at::toOpMathType(input.scalar_type()));

  at::Tensor grad_input = at::empty({0}, input.options());
  at::Tensor grad_weight = at::empty({0}, weight.options());
  at::Tensor grad_bias = at::empty({0}, weight.options());
  if (output_mask[0]) {
    // Every element is written by the dgrad convolution, unless grad_out is empty (C_out = 0).
    grad_input = grad_out.numel() > 0 ? empty_huge(input.sizes(), input.options())
                                      : at::zeros(input.sizes(), input.options());
    if (grad_input.numel() > 0 && grad_out.numel() > 0) {
      // The dgrad convolution's weight W'[ci, co, ky, kx] = W[co, ci, kh-1-ky, kw-1-kx].
      const at::Tensor flipped = use_shifted_rows(dgrad_geometry(g)) ? dgrad_matrix(weight) : dgrad_taps(weight);
      UNET_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv2d_dgrad_cpu", [&] {
        const auto out_parts = [&](const at::Tensor& t) {
          return dense_parts(t.const_data_ptr<scalar_t>(), g.out_channels, g.out_h, g.out_w);
        };
        const Source<scalar_t> mask = masked ? out_parts(output) : Source<scalar_t>{};
        convolve<scalar_t>(dgrad_geometry(g), out_parts(grad_out), masked ? &mask : nullptr, flipped,
                           at::Tensor(), false,
                           dense_parts(grad_input.mutable_data_ptr<scalar_t>(), g.in_channels, g.in_h, g.in_w));
      });
    }
    if (format == at::MemoryFormat::ChannelsLast) grad_input = grad_input.contiguous(format);
  }
  if (output_mask[1] || output_mask[2]) {
    at::Tensor grad_weight_acc = at::zeros(weight.sizes(), acc_options);
    at::Tensor bias_acc = at::zeros({g.out_channels}, acc_options);
    if (grad_out.numel() > 0) {
      UNET_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv2d_wgrad_cpu", [&] {
        weight_gradients<scalar_t>(g, dense_parts(input.const_data_ptr<scalar_t>(), g.in_channels, g.in_h, g.in_w),
                                   grad_out.const_data_ptr<scalar_t>(),
                                   masked ? output.const_data_ptr<scalar_t>() : nullptr,
                                   grad_weight_acc, bias_acc);
      });
      if (output_mask[1]) {
        grad_weight_acc = wgrad_matching_stock(grad_weight_acc, grad_out, input, weight,
                                               masked ? output : at::Tensor(), padding);
      }
    }
    if (output_mask[1]) grad_weight = grad_weight_acc.to(weight.scalar_type()).contiguous(weight.suggest_memory_format());
    if (output_mask[2]) grad_bias = bias_acc.to(weight.scalar_type());
  }
  return {grad_input, grad_weight, grad_bias};
}

// dgrad by Winograd where use_winograd takes the dgrad convolution (the masked gradient with the
// flipped weight), the weight and bias grads by Winograd F(3x3, 4x4) where use_winograd_wgrad takes
// them; the rest (and any call with a non-finite result on the Winograd path) by
// conv2d_backward_direct.
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& input_arg, const at::Tensor& weight,
    const std::optional<at::Tensor>& output_arg, int64_t padding, std::array<bool, 3> output_mask) {
  const ConvGeometry g = conv2d_geometry("unet_ext._conv2d_backward", input_arg, weight, std::nullopt, padding);
  const auto dtype = input_arg.scalar_type();
  const bool masked = output_arg.has_value() && output_arg->defined();
  const bool wino_dgrad = output_mask[0] && winograd::use_winograd(dgrad_geometry(g), dtype, true);
  const bool wino_wgrad = output_mask[1] && winograd::use_winograd_wgrad(g, dtype);
  if (!(wino_dgrad || wino_wgrad) || !grad_out.sizes().equals({g.batch, g.out_channels, g.out_h, g.out_w}) ||
      (masked && !output_arg->sizes().equals(grad_out.sizes()))) {
    return conv2d_backward_direct(grad_out, input_arg, weight, output_arg, padding, output_mask);  // it checks
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor grad = grad_out.to(at::kFloat).contiguous();
  const at::Tensor output = masked ? output_arg->to(at::kFloat).contiguous() : at::Tensor();
  const auto grad_parts = [&](const at::Tensor& t) { return dense_parts(t.const_data_ptr<float>(), g.out_channels, g.out_h, g.out_w); };
  const ChannelParts<const float> mask = masked ? grad_parts(output) : ChannelParts<const float>{};
  std::array<bool, 3> direct = output_mask;  // what is left for the direct path
  at::Tensor grad_input = at::empty({0}, input_arg.options());
  at::Tensor grad_weight = at::empty({0}, weight.options()), grad_bias = at::empty({0}, weight.options());
  if (wino_dgrad) {
    grad_input = empty_huge(input_arg.sizes(), input_arg.options());
    const bool few = winograd::use_few_tiles(dgrad_geometry(g));
    if (winograd::convolve(dgrad_geometry(g), grad_parts(grad), masked ? &mask : nullptr, winograd::dgrad_filter(weight, few),
                           nullptr, false, dense_parts(grad_input.mutable_data_ptr<float>(), g.in_channels, g.in_h, g.in_w))) {
      const auto format = conv_memory_format(input_arg);
      if (format == at::MemoryFormat::ChannelsLast) grad_input = grad_input.contiguous(format);
      direct[0] = false;
    }  // else non-finite: the direct path's
  }
  if (wino_wgrad) {
    const at::Tensor input = input_arg.contiguous();
    at::Tensor gw = empty_huge(weight.sizes(), weight.options().dtype(at::kFloat));
    at::Tensor gb = at::empty({g.out_channels}, weight.options().dtype(at::kFloat));
    if (winograd::weight_gradient(g, dense_parts(input.const_data_ptr<float>(), g.in_channels, g.in_h, g.in_w),
                                  grad_parts(grad), masked ? &mask : nullptr, gw.mutable_data_ptr<float>(),
                                  gb.mutable_data_ptr<float>())) {
      grad_weight = gw.to(weight.scalar_type()).contiguous(weight.suggest_memory_format());
      if (output_mask[2]) grad_bias = gb.to(weight.scalar_type());
      direct[1] = direct[2] = false;
    }  // else non-finite: the direct path's
  }
  if (direct[0] || direct[1] || direct[2]) {
    auto [gi, gw, gb] = conv2d_backward_direct(grad_out, input_arg, weight, output_arg, padding, direct);
    if (direct[0]) grad_input = gi;
    if (direct[1]) grad_weight = gw;
    if (direct[2]) grad_bias = gb;
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
