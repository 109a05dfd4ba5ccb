// conv2d_relu_concat and its backward on the CPU: the kernels of cpu/conv2d_kernel.h on a two-part
// source (conv2d_relu.h's ChannelParts: the skip's crop window, then up), so the concatenation is
// never materialised; dgrad writes grad_skip's window and grad_up from the epilogue. float32 with
// enough channels takes Winograd F(4x4, 3x3) (cpu/winograd_cpu.h) on the same two-part source:
// forward, dgrad and wgrad.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "conv2d_kernel.h"
#include "conv_wgrad_bf16.h"
#include "conv_wgrad_nonfinite.h"
#include "winograd_cpu.h"

namespace unet_ext {
namespace conv {
namespace {

using namespace cpu_kernel;  // NOLINT: the kernels and their helpers

// conv2d_relu_concat's input materialised: [skip cropped to up's size, up] on channels.
// Made in a block of the output cache (empty_huge, no page faults on a reused size), in the
// inputs' layout (channels_last where both are).
at::Tensor cropped_concat(const ConcatGeometry& c, const at::Tensor& skip, const at::Tensor& up) {
  at::Tensor out = empty_huge({c.conv.batch, c.conv.in_channels, c.conv.in_h, c.conv.in_w}, up.options(),
                              conv_memory_format(skip, up));
  return at::cat_out(out, {skip.narrow(2, c.top, c.conv.in_h).narrow(3, c.left, c.conv.in_w), up}, 1);
}

at::Tensor conv2d_relu_concat_cpu(const at::Tensor& skip_arg, const at::Tensor& up_arg,
                                  const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                  int64_t padding) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const ConcatGeometry c = conv2d_concat_geometry("unet_ext.conv2d_relu_concat", skip_arg, up_arg,
                                                  weight, bias, padding);
  const ConvGeometry& g = c.conv;
  const auto format = conv_output_format(skip_arg, up_arg, weight);
  bool per_call = true;
  if (winograd::use_winograd_forward(g, skip_arg.scalar_type(), weight, &per_call)) {
    at::Tensor output = empty_huge({g.batch, g.out_channels, g.out_h, g.out_w}, skip_arg.options());
    const at::Tensor skip = skip_arg.contiguous(), up = up_arg.contiguous();
    const at::Tensor bias_acc = bias.has_value() && bias->defined() ? opmath_contiguous(*bias) : at::Tensor();
    const bool few = per_call && winograd::use_few_tiles(g);  // cached filters: the brgemm path
    if (winograd::convolve(g, c.parts(skip.const_data_ptr<float>(), up.const_data_ptr<float>()), nullptr,
                           winograd::forward_filter(weight, few, per_call), bias_acc.defined() ? bias_acc.const_data_ptr<float>() : nullptr,
                           true, dense_parts(output.mutable_data_ptr<float>(), g.out_channels, g.out_h, g.out_w))) {
      return format == at::MemoryFormat::ChannelsLast ? output.contiguous(format) : output;
    }
    // A non-finite value: the paths below give stock's NaN and infinities.
  }
  if (use_onednn(g, skip_arg.scalar_type()) && g.batch * g.out_h * g.out_w > 0) {
    // oneDNN reads one tensor: the (small, deep-level) concatenation is made after all.
    return onednn_forward(cropped_concat(c, skip_arg, up_arg), weight, bias, padding, true).contiguous(format);
  }
  at::Tensor output = empty_huge({g.batch, g.out_channels, g.out_h, g.out_w}, skip_arg.options());
  if (output.numel() > 0) {
    const at::Tensor skip = skip_arg.contiguous(), up = up_arg.contiguous();
    const at::Tensor taps = use_shifted_rows(g) ? opmath_contiguous(weight) : forward_taps(weight);
    const at::Tensor bias_acc = bias.has_value() && bias->defined() ? opmath_contiguous(*bias) : at::Tensor();
    UNET_DISPATCH_FLOATING_TYPES(skip.scalar_type(), "conv2d_relu_concat_cpu", [&] {
      convolve<scalar_t>(g, c.parts(skip.const_data_ptr<scalar_t>(), up.const_data_ptr<scalar_t>()),
                         nullptr, taps, bias_acc, true,
                         dense_parts(output.mutable_data_ptr<scalar_t>(), g.out_channels, g.out_h, g.out_w));
    });
  }
  return format == at::MemoryFormat::ChannelsLast ? output.contiguous(format) : output;
}

// Zeroes grad_skip (dense NCHW) outside the crop window, which dgrad writes.
template <typename scalar_t>
void zero_outside_window(const ConcatGeometry& c, scalar_t* grad_skip) {
  const int64_t plane = c.skip_h * c.skip_w, height = c.conv.in_h, width = c.conv.in_w;
  const int64_t planes = c.conv.batch * c.skip_channels;
  at::parallel_for(0, planes, std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, plane)),
                   [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      scalar_t* d = grad_skip + p * plane;
      std::fill(d, d + c.top * c.skip_w, scalar_t(0));
      for (int64_t h = c.top; h < c.top + height; ++h) {
        std::fill(d + h * c.skip_w, d + h * c.skip_w + c.left, scalar_t(0));
        std::fill(d + h * c.skip_w + c.left + width, d + (h + 1) * c.skip_w, scalar_t(0));
      }
      std::fill(d + (c.top + height) * c.skip_w, d + plane, scalar_t(0));
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv2d_relu_concat_backward_direct(
    const at::Tensor& grad_out_arg, const at::Tensor& skip_arg, const at::Tensor& up_arg,
    const at::Tensor& weight, const at::Tensor& output_arg, int64_t padding,
    std::array<bool, 4> output_mask) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  constexpr const char* op = "unet_ext._conv2d_relu_concat_backward";
  const ConcatGeometry c = conv2d_concat_geometry(op, skip_arg, up_arg, weight, std::nullopt, padding);
  const ConvGeometry& g = c.conv;
  const std::vector<int64_t> out_shape{g.batch, g.out_channels, g.out_h, g.out_w};
  TORCH_CHECK(grad_out_arg.sizes().equals(out_shape), op, ": grad_out must have shape ",
              at::IntArrayRef(out_shape), ", got ", grad_out_arg.sizes());
  TORCH_CHECK(output_arg.sizes().equals(out_shape), op, ": output must have shape ",
              at::IntArrayRef(out_shape), ", got ", output_arg.sizes());
  if (use_onednn(g, skip_arg.scalar_type()) && grad_out_arg.numel() > 0 && g.in_channels > 0) {
    const auto format = conv_memory_format(skip_arg, up_arg);
    const at::Tensor grad = grad_out_arg.to(skip_arg.scalar_type());
    const at::Tensor masked_grad = relu_backward(grad, output_arg, format);
    at::Tensor gi, gw, gb;
    if ((output_mask[2] || output_mask[3]) && skip_arg.scalar_type() == at::kBFloat16 &&
        format == at::MemoryFormat::ChannelsLast && use_bf16_wgrad(g)) {
      // The weight and bias gradients by ours (conv_wgrad_bf16.h) on the skip's crop window and
      // up where they lie; dgrad by oneDNN, which reads only its input's shape (the
      // concatenation is not made: an uninitialised block of that shape stands in).
      if (output_mask[0] || output_mask[1]) {
        const at::Tensor shape_only = empty_huge({g.batch, g.in_channels, g.in_h, g.in_w}, skip_arg.options(), format);
        gi = std::get<0>(at::convolution_backward(masked_grad, shape_only, weight,
                                                  std::vector<int64_t>{g.out_channels}, {1, 1}, {padding, padding},
                                                  {1, 1}, false, {0, 0}, 1, {true, false, false}));
      }
      std::tie(gw, gb) = bf16_weight_gradient(
          g, masked_grad,
          {Bf16WgradPart{skip_arg.contiguous(format), c.top, c.left}, Bf16WgradPart{up_arg.contiguous(format), 0, 0}},
          weight, {false, output_mask[2], output_mask[3]});
    } else {
      std::tie(gi, gw, gb) = at::convolution_backward(
          masked_grad, cropped_concat(c, skip_arg, up_arg).contiguous(format), weight,
          std::vector<int64_t>{g.out_channels}, {1, 1}, {padding, padding}, {1, 1}, false, {0, 0}, 1,
          {output_mask[0] || output_mask[1], output_mask[2], output_mask[3]});
    }
    at::Tensor grad_skip = at::empty({0}, skip_arg.options()), grad_up = at::empty({0}, up_arg.options());
    if (output_mask[0]) {  // zero outside the crop window
      // Each grad in its input's layout; cached blocks (empty_huge) where activation-sized.
      grad_skip = empty_huge(skip_arg.sizes(), skip_arg.options(), conv_memory_format(skip_arg)).zero_();
      grad_skip.narrow(2, c.top, g.in_h).narrow(3, c.left, g.in_w).copy_(gi.narrow(1, 0, c.skip_channels));
    }
    if (output_mask[1]) {
      grad_up = empty_huge(up_arg.sizes(), up_arg.options(), conv_memory_format(up_arg))
                    .copy_(gi.narrow(1, c.skip_channels, g.in_channels - c.skip_channels));
    }
    return {grad_skip, grad_up,
            output_mask[2] ? gw.contiguous(weight.suggest_memory_format()) : at::empty({0}, weight.options()),
            output_mask[3] ? gb : at::empty({0}, weight.options())};
  }
  const at::Tensor skip = skip_arg.contiguous(), up = up_arg.contiguous();
  const at::Tensor grad_out = grad_out_arg.to(skip.scalar_type()).contiguous();
  const at::Tensor output = output_arg.to(skip.scalar_type()).contiguous();
  const auto acc_options = skip.options().dtype(at::toOpMathType(skip.scalar_type()));

  at::Tensor grad_skip = at::empty({0}, skip.options());
  at::Tensor grad_up = at::empty({0}, up.options());
  at::Tensor grad_weight = at::empty({0}, weight.options());
  at::Tensor grad_bias = at::empty({0}, weight.options());
  if (output_mask[0] || output_mask[1]) {
    // dgrad writes both straight from its epilogue: grad_skip's crop window (zero around it)
    // and grad_up. Nothing is written when grad_out is empty (C_out = 0): zeros then.
    const bool empty = grad_out.numel() == 0;
    at::Tensor gs = empty ? at::zeros(skip.sizes(), skip.options()) : empty_huge(skip.sizes(), skip.options());
    at::Tensor gu = empty ? at::zeros(up.sizes(), up.options()) : empty_huge(up.sizes(), up.options());
    if (!empty && gs.numel() + gu.numel() > 0) {
      const at::Tensor flipped = use_shifted_rows(dgrad_geometry(g)) ? dgrad_matrix(weight) : dgrad_taps(weight);
      UNET_DISPATCH_FLOATING_TYPES(skip.scalar_type(), "conv2d_relu_concat_dgrad_cpu", [&] {
        scalar_t* gs_data = gs.mutable_data_ptr<scalar_t>();
        if (gs.numel() > 0) zero_outside_window(c, gs_data);
        const Source<scalar_t> mask = dense_parts(output.const_data_ptr<scalar_t>(), g.out_channels, g.out_h, g.out_w);
        convolve<scalar_t>(dgrad_geometry(g),
                           dense_parts(grad_out.const_data_ptr<scalar_t>(), g.out_channels, g.out_h, g.out_w),
                           &mask, flipped, at::Tensor(), false, c.parts(gs_data, gu.mutable_data_ptr<scalar_t>()));
      });
    }
    const auto skip_format = conv_memory_format(skip_arg), up_format = conv_memory_format(up_arg);
    if (output_mask[0]) grad_skip = skip_format == at::MemoryFormat::ChannelsLast ? gs.contiguous(skip_format) : gs;
    if (output_mask[1]) grad_up = up_format == at::MemoryFormat::ChannelsLast ? gu.contiguous(up_format) : gu;
  }
  if (output_mask[2] || output_mask[3]) {
    at::Tensor grad_weight_acc = at::zeros(weight.sizes(), acc_options);
    at::Tensor bias_acc = at::zeros({g.out_channels}, acc_options);
    if (grad_out.numel() > 0) {
      UNET_DISPATCH_FLOATING_TYPES(skip.scalar_type(), "conv2d_relu_concat_wgrad_cpu", [&] {
        weight_gradients<scalar_t>(g, c.parts(skip.const_data_ptr<scalar_t>(), up.const_data_ptr<scalar_t>()),
                                   grad_out.const_data_ptr<scalar_t>(), output.const_data_ptr<scalar_t>(),
                                   grad_weight_acc, bias_acc);
      });
      if (output_mask[2]) {
        grad_weight_acc = wgrad_matching_stock(grad_weight_acc, grad_out, cropped_concat(c, skip, up),
                                               weight, output, padding);
      }
    }
    if (output_mask[2]) grad_weight = grad_weight_acc.to(weight.scalar_type()).contiguous(weight.suggest_memory_format());
    if (output_mask[3]) grad_bias = bias_acc.to(weight.scalar_type());
  }
  return {grad_skip, grad_up, grad_weight, grad_bias};
}

// dgrad by Winograd (grad_skip's crop window and grad_up written from its output transform) where
// use_winograd takes the dgrad convolution; the weight and bias grads by Winograd F(3x3, 4x4) (its
// input transform reads the crop window in place) where use_winograd_wgrad takes them; the rest
// (and any non-finite result on the Winograd path) by the direct backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv2d_relu_concat_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& skip_arg, const at::Tensor& up_arg,
    const at::Tensor& weight, const at::Tensor& output_arg, int64_t padding,
    std::array<bool, 4> output_mask) {
  const ConcatGeometry c = conv2d_concat_geometry("unet_ext._conv2d_relu_concat_backward", skip_arg, up_arg,
                                                  weight, std::nullopt, padding);
  const ConvGeometry& g = c.conv;
  const auto dtype = skip_arg.scalar_type();
  const std::vector<int64_t> out_shape{g.batch, g.out_channels, g.out_h, g.out_w};
  const bool wino_dgrad = (output_mask[0] || output_mask[1]) && winograd::use_winograd(dgrad_geometry(g), dtype, true);
  const bool wino_wgrad = output_mask[2] && winograd::use_winograd_wgrad(g, dtype);
  if (!(wino_dgrad || wino_wgrad) || !grad_out.sizes().equals(out_shape) || !output_arg.sizes().equals(out_shape)) {
    return conv2d_relu_concat_backward_direct(grad_out, skip_arg, up_arg, weight, output_arg, padding, output_mask);
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor skip = skip_arg.contiguous(), up = up_arg.contiguous();
  const at::Tensor grad = grad_out.to(at::kFloat).contiguous(), output = output_arg.to(at::kFloat).contiguous();
  const auto grad_parts = [&](const at::Tensor& t) { return dense_parts(t.const_data_ptr<float>(), g.out_channels, g.out_h, g.out_w); };
  const ChannelParts<const float> mask = grad_parts(output);
  std::array<bool, 4> direct = output_mask;  // what is left for the direct path
  at::Tensor grad_skip = at::empty({0}, skip.options()), grad_up = at::empty({0}, up.options());
  at::Tensor grad_weight = at::empty({0}, weight.options()), grad_bias = at::empty({0}, weight.options());
  if (wino_dgrad) {
    at::Tensor gs = empty_huge(skip.sizes(), skip.options()), gu = empty_huge(up.sizes(), up.options());
    if (gs.numel() > 0) zero_outside_window(c, gs.mutable_data_ptr<float>());
    const bool few = winograd::use_few_tiles(dgrad_geometry(g));
    if (winograd::convolve(dgrad_geometry(g), grad_parts(grad), &mask, winograd::dgrad_filter(weight, few), nullptr, false,
                           c.parts(gs.mutable_data_ptr<float>(), gu.mutable_data_ptr<float>()))) {
      const auto skip_format = conv_memory_format(skip_arg), up_format = conv_memory_format(up_arg);
      if (output_mask[0]) grad_skip = skip_format == at::MemoryFormat::ChannelsLast ? gs.contiguous(skip_format) : gs;
      if (output_mask[1]) grad_up = up_format == at::MemoryFormat::ChannelsLast ? gu.contiguous(up_format) : gu;
      direct[0] = direct[1] = false;
    }  // else non-finite: the direct path's
  }
  if (wino_wgrad) {
    at::Tensor gw = empty_huge(weight.sizes(), weight.options().dtype(at::kFloat));
    at::Tensor gb = at::empty({g.out_channels}, weight.options().dtype(at::kFloat));
    if (winograd::weight_gradient(g, c.parts(skip.const_data_ptr<float>(), up.const_data_ptr<float>()), grad_parts(grad),
                                  &mask, gw.mutable_data_ptr<float>(), gb.mutable_data_ptr<float>())) {
      grad_weight = gw.to(weight.scalar_type()).contiguous(weight.suggest_memory_format());
      if (output_mask[3]) grad_bias = gb.to(weight.scalar_type());
      direct[2] = direct[3] = false;
    }  // else non-finite: the direct path's
  }
  if (direct[0] || direct[1] || direct[2] || direct[3]) {
    auto [gs, gu, gw, gb] = conv2d_relu_concat_backward_direct(grad_out, skip_arg, up_arg, weight, output_arg, padding, direct);
    if (direct[0]) grad_skip = gs;
    if (direct[1]) grad_up = gu;
    if (direct[2]) grad_weight = gw;
    if (direct[3]) grad_bias = gb;
  }
  return {grad_skip, grad_up, grad_weight, grad_bias};
}

}  // namespace
}  // namespace conv
}  // namespace unet_ext

TORCH_LIBRARY_IMPL(unet_ext, CPU, m) {
  m.impl("conv2d_relu_concat", &unet_ext::conv::conv2d_relu_concat_cpu);
  m.impl("_conv2d_relu_concat_backward", &unet_ext::conv::conv2d_relu_concat_backward_cpu);
}
