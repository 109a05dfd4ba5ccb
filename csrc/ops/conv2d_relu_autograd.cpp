// Autograd of the convolutions (conv2d_relu, conv2d_bias, conv2d_relu_concat, conv_transpose2x2)
// and max_pool2x2 in C++ (every device): each saves what its backward op reads and calls it for
// the grads that are needed. torch.library.register_autograd's Python wrapper cost ~0.1 ms a call
// forward and backward, 31 calls a U-Net training step.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>
#include <c10/core/GradMode.h>

#include <array>

namespace unet_ext {
namespace conv {
namespace {

using ConvSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t);
using BackwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t,
    std::array<bool, 3>);

// kGradModeNote: Function::apply runs forward with grad mode off; the kernels run under the
// caller's (the CPU conv caches Winograd filters only outside grad mode: winograd.cpp), as they
// did under the Python autograd.
template <typename Signature>
c10::TypedOperatorHandle<Signature> find(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

class Conv2dFunction : public torch::autograd::Function<Conv2dFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, int64_t padding, bool relu, bool grad_enabled) {
    static const auto relu_op = find<ConvSignature>("unet_ext::conv2d_relu");
    static const auto bias_op = find<ConvSignature>("unet_ext::conv2d_bias");
    at::Tensor output;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      c10::AutoGradMode grad_mode(grad_enabled);  // see kGradModeNote
      output = (relu ? relu_op : bias_op).call(input, weight, bias, padding);
    }
    // conv2d_bias does not keep its output alive.
    ctx->save_for_backward({input, weight, relu ? output : at::Tensor()});
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return output;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static const auto backward_op = find<BackwardSignature>("unet_ext::_conv2d_backward");
    const auto saved = ctx->get_saved_variables();
    // A missing bias has no input edge: ask for its grad only when there is one.
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                   ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)};
    torch::autograd::variable_list result(6);
    if (!(mask[0] || mask[1] || mask[2])) return result;
    const std::optional<at::Tensor> output = saved[2].defined() ? std::optional<at::Tensor>(saved[2]) : std::nullopt;
    auto [grad_input, grad_weight, grad_bias] =
        backward_op.call(grads[0], saved[0], saved[1], output, ctx->saved_data["padding"].toInt(), mask);
    if (mask[0]) result[0] = grad_input;
    if (mask[1]) result[1] = grad_weight;
    if (mask[2]) result[2] = grad_bias;
    return result;
  }
};

class Conv2dReluConcatFunction : public torch::autograd::Function<Conv2dReluConcatFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& skip, const at::Tensor& up,
                            const at::Tensor& weight, const std::optional<at::Tensor>& bias, int64_t padding,
                            bool grad_enabled) {
    static const auto op = find<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const std::optional<at::Tensor>&, int64_t)>("unet_ext::conv2d_relu_concat");
    at::Tensor output;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      c10::AutoGradMode grad_mode(grad_enabled);  // see kGradModeNote
      output = op.call(skip, up, weight, bias, padding);
    }
    ctx->save_for_backward({skip, up, weight, output});
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return output;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static const auto op = find<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
        std::array<bool, 4>)>("unet_ext::_conv2d_relu_concat_backward");
    const auto saved = ctx->get_saved_variables();
    const std::array<bool, 4> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2),
                                   ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(3)};
    torch::autograd::variable_list result(6);
    if (!(mask[0] || mask[1] || mask[2] || mask[3])) return result;
    auto [grad_skip, grad_up, grad_weight, grad_bias] =
        op.call(grads[0], saved[0], saved[1], saved[2], saved[3], ctx->saved_data["padding"].toInt(), mask);
    if (mask[0]) result[0] = grad_skip;
    if (mask[1]) result[1] = grad_up;
    if (mask[2]) result[2] = grad_weight;
    if (mask[3]) result[3] = grad_bias;
    return result;
  }
};

class ConvTranspose2x2Function : public torch::autograd::Function<ConvTranspose2x2Function> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, bool grad_enabled) {
    static const auto op = find<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&)>(
        "unet_ext::conv_transpose2x2");
    at::Tensor output;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      c10::AutoGradMode grad_mode(grad_enabled);  // see kGradModeNote
      output = op.call(input, weight, bias);
    }
    ctx->save_for_backward({input, weight});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return output;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static const auto op = find<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, std::array<bool, 3>)>(
        "unet_ext::_conv_transpose2x2_backward");
    const auto saved = ctx->get_saved_variables();
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                   ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)};
    torch::autograd::variable_list result(4);
    if (!(mask[0] || mask[1] || mask[2])) return result;
    auto [grad_input, grad_weight, grad_bias] = op.call(grads[0], saved[0], saved[1], mask);
    if (mask[0]) result[0] = grad_input;
    if (mask[1]) result[1] = grad_weight;
    if (mask[2]) result[2] = grad_bias;
    return result;
  }
};

class MaxPool2x2Function : public torch::autograd::Function<MaxPool2x2Function> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& input, bool grad_enabled) {
    static const auto op = find<at::Tensor(const at::Tensor&)>("unet_ext::max_pool2x2");
    at::Tensor output;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      c10::AutoGradMode grad_mode(grad_enabled);  // see kGradModeNote
      output = op.call(input);
    }
    ctx->save_for_backward({input});
    return output;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static const auto op = find<at::Tensor(const at::Tensor&, const at::Tensor&)>("unet_ext::_max_pool2x2_backward");
    return {op.call(grads[0], ctx->get_saved_variables()[0]), at::Tensor()};
  }
};

at::Tensor conv2d_relu_autograd(const at::Tensor& input, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, int64_t padding) {
  return Conv2dFunction::apply(input, weight, bias, padding, true, c10::GradMode::is_enabled());
}

at::Tensor conv2d_bias_autograd(const at::Tensor& input, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, int64_t padding) {
  return Conv2dFunction::apply(input, weight, bias, padding, false, c10::GradMode::is_enabled());
}

at::Tensor conv2d_relu_concat_autograd(const at::Tensor& skip, const at::Tensor& up, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias, int64_t padding) {
  return Conv2dReluConcatFunction::apply(skip, up, weight, bias, padding, c10::GradMode::is_enabled());
}

at::Tensor conv_transpose2x2_autograd(const at::Tensor& input, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias) {
  return ConvTranspose2x2Function::apply(input, weight, bias, c10::GradMode::is_enabled());
}

at::Tensor max_pool2x2_autograd(const at::Tensor& input) {
  return MaxPool2x2Function::apply(input, c10::GradMode::is_enabled());
}

}  // namespace
}  // namespace conv
}  // namespace unet_ext

TORCH_LIBRARY_IMPL(unet_ext, Autograd, m) {
  m.impl("conv2d_relu", &unet_ext::conv::conv2d_relu_autograd);
  m.impl("conv2d_bias", &unet_ext::conv::conv2d_bias_autograd);
  m.impl("conv2d_relu_concat", &unet_ext::conv::conv2d_relu_concat_autograd);
  m.impl("conv_transpose2x2", &unet_ext::conv::conv_transpose2x2_autograd);
  m.impl("max_pool2x2", &unet_ext::conv::max_pool2x2_autograd);
}
