"""conv2d_relu / conv2d_bias (stride-1 convolution with the bias and ReLU fused into its
epilogue), conv2d_relu_concat (the same on crop_concat(skip, up), never materialised) and
conv_transpose2x2 (the U-Net up-conv): wrappers, fake kernels, autograd."""
from typing import Optional

import torch
from torch._prims_common import suggest_memory_format

__all__ = ["conv2d_relu", "conv2d_bias", "conv2d_relu_concat", "conv_transpose2x2"]


def conv2d_relu(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                padding: int = 0) -> torch.Tensor:
    """``relu(F.conv2d(input, weight, bias, stride=1, padding=padding))`` in one kernel.

    input (N, C_in, H, W), weight (C_out, C_in, kh, kw), bias (C_out,) or None. padding 0 is the
    paper's "valid" convolution, k // 2 is "same". The output is channels_last when the input or the
    weight is (stock's rule).
    Backward saves only input, weight and the output (the gradient is zero where ``output <= 0``, as torch.relu's).
    """
    return torch.ops.unet_ext.conv2d_relu.default(input, weight, bias, int(padding))


def conv2d_bias(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                padding: int = 0) -> torch.Tensor:
    """``F.conv2d(input, weight, bias, stride=1, padding=padding)``: conv2d_relu's kernel with the
    ReLU off (the U-Net's 1x1 head)."""
    return torch.ops.unet_ext.conv2d_bias.default(input, weight, bias, int(padding))


def conv2d_relu_concat(skip: torch.Tensor, up: torch.Tensor, weight: torch.Tensor,
                       bias: Optional[torch.Tensor] = None, padding: int = 0) -> torch.Tensor:
    """``conv2d_relu(crop_concat(skip, up), weight, bias, padding)`` without materialising the
    concatenation: the U-Net decoder's first conv of each level.

    skip (N, Cs, Hs, Ws) is centre-cropped to up's (N, Cu, H, W) (offset ((Hs - H) // 2,
    (Ws - W) // 2)); weight (C_out, Cs + Cu, kh, kw), its first Cs input channels applied to the
    skip. The output is channels_last when both inputs are, or the weight is. Backward saves skip,
    up, weight and the output; grad_skip is zero outside the crop window.
    """
    return torch.ops.unet_ext.conv2d_relu_concat.default(skip, up, weight, bias, int(padding))


def conv_transpose2x2(input: torch.Tensor, weight: torch.Tensor,
                      bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.conv_transpose2d(input, weight, bias, stride=2)`` with weight (C_in, C_out, 2, 2):
    the U-Net up-conv, (N, C_in, H, W) -> (N, C_out, 2H, 2W)."""
    return torch.ops.unet_ext.conv_transpose2x2.default(input, weight, bias)


def _format(t):
    return torch.channels_last if suggest_memory_format(t) == torch.channels_last else torch.contiguous_format


def _out_format(input, weight):
    """Stock's rule for a convolution's output (cuDNN's and oneDNN's): channels_last when the input
    or the weight is (a one-channel input is ambiguous; the model's channels_last weights decide)."""
    either = torch.channels_last in (_format(input), _format(weight))
    return torch.channels_last if either else torch.contiguous_format


def _check_conv(op, input, weight, bias, padding):
    torch._check(input.dim() == 4, lambda: f"unet_ext.{op}: input must be a 4-D tensor, got {input.dim()}-D")
    torch._check(weight.dim() == 4, lambda: f"unet_ext.{op}: weight must be a 4-D tensor, got {weight.dim()}-D")
    return _conv_output_shape(f"unet_ext.{op}", input.shape[0], input.shape[1], input.shape[2:],
                              weight, bias, padding)


def _conv_output_shape(op, batch, channels, spatial, weight, bias, padding):
    """Checks weight (C_out, channels, kh, kw), bias and padding; the output shape."""
    torch._check(padding >= 0, lambda: f"{op}: padding must be >= 0, got {padding}")
    torch._check(weight.shape[1] == channels,
                 lambda: f"{op}: weight must have shape [C_out, {channels}, kh, kw], got {tuple(weight.shape)}")
    if bias is not None:
        torch._check(bias.shape == (weight.shape[0],),
                     lambda: f"{op}: bias must have shape [{weight.shape[0]}], got {tuple(bias.shape)}")
    out_h = spatial[0] + 2 * padding - weight.shape[2] + 1
    out_w = spatial[1] + 2 * padding - weight.shape[3] + 1
    torch._check(out_h >= 1 and out_w >= 1, lambda: f"{op}: kernel is larger than the padded input")
    return (batch, weight.shape[0], out_h, out_w)


def _make_conv_fake(op):
    def fake(input, weight, bias, padding):
        shape = _check_conv(op, input, weight, bias, padding)
        return input.new_empty(shape).contiguous(memory_format=_out_format(input, weight))
    return fake


torch.library.register_fake("unet_ext::conv2d_relu")(_make_conv_fake("conv2d_relu"))
torch.library.register_fake("unet_ext::conv2d_bias")(_make_conv_fake("conv2d_bias"))


@torch.library.register_fake("unet_ext::_conv2d_backward")
def _(grad_out, input, weight, output, padding, output_mask):
    grad_input = input.new_empty(input.shape).contiguous(memory_format=_format(input)) if output_mask[0] else input.new_empty(0)
    grad_weight = weight.new_empty(weight.shape).contiguous(memory_format=_format(weight)) if output_mask[1] else weight.new_empty(0)
    grad_bias = weight.new_empty(weight.shape[0]) if output_mask[2] else weight.new_empty(0)
    return grad_input, grad_weight, grad_bias


# conv2d_relu's and conv2d_bias's autograd is in C++ (csrc/ops/conv2d_relu_autograd.cpp): the Python
# wrapper's overhead per call was measurable in a training step.


def _check_conv_concat(skip, up, weight, bias, padding):
    op = "unet_ext.conv2d_relu_concat"
    torch._check(skip.dim() == 4, lambda: f"{op}: skip must be a 4-D tensor, got {skip.dim()}-D")
    torch._check(up.dim() == 4, lambda: f"{op}: up must be a 4-D tensor, got {up.dim()}-D")
    torch._check(weight.dim() == 4, lambda: f"{op}: weight must be a 4-D tensor, got {weight.dim()}-D")
    torch._check(skip.dtype == up.dtype and skip.dtype == weight.dtype,
                 lambda: f"{op}: skip, up and weight must have the same dtype")
    torch._check(skip.shape[0] == up.shape[0], lambda: f"{op}: skip and up must have the same batch size")
    torch._check(up.shape[2] <= skip.shape[2] and up.shape[3] <= skip.shape[3],
                 lambda: f"{op}: up's spatial size must not exceed skip's")
    return _conv_output_shape(op, up.shape[0], skip.shape[1] + up.shape[1], up.shape[2:],
                              weight, bias, padding)


def _concat_format(skip, up, weight):
    """channels_last when both inputs are (crop_concat's format, torch.cat's rule) or the weight is
    (then the conv's rule)."""
    both = _format(skip) == torch.channels_last and _format(up) == torch.channels_last
    return torch.channels_last if both or _format(weight) == torch.channels_last else torch.contiguous_format


@torch.library.register_fake("unet_ext::conv2d_relu_concat")
def _(skip, up, weight, bias, padding):
    shape = _check_conv_concat(skip, up, weight, bias, padding)
    return skip.new_empty(shape).contiguous(memory_format=_concat_format(skip, up, weight))


@torch.library.register_fake("unet_ext::_conv2d_relu_concat_backward")
def _(grad_out, skip, up, weight, output, padding, output_mask):
    def like(t, wanted):
        return t.new_empty(t.shape).contiguous(memory_format=_format(t)) if wanted else t.new_empty(0)
    grad_bias = weight.new_empty(weight.shape[0]) if output_mask[3] else weight.new_empty(0)
    return like(skip, output_mask[0]), like(up, output_mask[1]), like(weight, output_mask[2]), grad_bias


# Its autograd is in C++ (csrc/ops/conv2d_relu_autograd.cpp).


def _check_up(input, weight, bias):
    torch._check(input.dim() == 4, lambda: f"unet_ext.conv_transpose2x2: input must be a 4-D tensor, got {input.dim()}-D")
    torch._check(weight.dim() == 4 and weight.shape[0] == input.shape[1] and tuple(weight.shape[2:]) == (2, 2),
                 lambda: f"unet_ext.conv_transpose2x2: weight must have shape [{input.shape[1]}, C_out, 2, 2], got {tuple(weight.shape)}")
    if bias is not None:
        torch._check(bias.shape == (weight.shape[1],),
                     lambda: f"unet_ext.conv_transpose2x2: bias must have shape [{weight.shape[1]}], got {tuple(bias.shape)}")
    return (input.shape[0], weight.shape[1], 2 * input.shape[2], 2 * input.shape[3])


@torch.library.register_fake("unet_ext::conv_transpose2x2")
def _(input, weight, bias):
    return input.new_empty(_check_up(input, weight, bias)).contiguous(memory_format=_out_format(input, weight))


@torch.library.register_fake("unet_ext::_conv_transpose2x2_backward")
def _(grad_out, input, weight, output_mask):
    grad_input = input.new_empty(input.shape).contiguous(memory_format=_format(input)) if output_mask[0] else input.new_empty(0)
    grad_weight = weight.new_empty(weight.shape).contiguous(memory_format=_format(weight)) if output_mask[1] else weight.new_empty(0)
    grad_bias = weight.new_empty(weight.shape[1]) if output_mask[2] else weight.new_empty(0)
    return grad_input, grad_weight, grad_bias


# Its autograd is in C++ (csrc/ops/conv2d_relu_autograd.cpp).


@torch.library.register_fake("unet_ext::_cast_weight")
def _(weight, dtype, memory_format):
    torch._check(memory_format == torch.contiguous_format or (memory_format == torch.channels_last and weight.dim() == 4),
                 lambda: f"unet_ext._cast_weight: memory_format must be contiguous_format, or channels_last for a 4-D weight, got {memory_format} for {weight.dim()}-D")
    return torch.empty_like(weight, dtype=dtype, memory_format=memory_format)

# Its autograd is in C++ (csrc/ops/cpu/cast_weight.cpp): a Python one cost ~0.1 ms a call.
