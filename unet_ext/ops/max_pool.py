"""max_pool2x2(input): the U-Net down-step, ``F.max_pool2d(input, 2)``, with a leaner backward."""
import torch
from torch._prims_common import suggest_memory_format

__all__ = ["max_pool2x2"]


def max_pool2x2(input: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(input, 2)``: 2x2 windows, stride 2, an odd last row/column dropped.

    input: (N, C, H, W) floating point, any layout; the output (N, C, H // 2, W // 2) is
    channels_last when the input is. NaN propagates and ties pick the first maximum, as stock
    PyTorch. For the backward only the input is kept (the argmax is recomputed from it), not
    an int64 index per output: in a U-Net the input is the encoder map that the conv before it
    keeps anyway.
    """
    return torch.ops.unet_ext.max_pool2x2.default(input)


def _check(input):
    torch._check(input.dim() == 4, lambda: f"unet_ext.max_pool2x2: input must be a 4-D tensor, got {input.dim()}-D")
    torch._check(input.dtype.is_floating_point,
                 lambda: f"unet_ext.max_pool2x2: input must be a floating-point tensor, got {input.dtype}")
    torch._check(input.shape[2] >= 2 and input.shape[3] >= 2,
                 lambda: "unet_ext.max_pool2x2: input's height and width must be at least 2 (one 2x2 window)")


def _format(t):
    return torch.channels_last if suggest_memory_format(t) == torch.channels_last else torch.contiguous_format


@torch.library.register_fake("unet_ext::max_pool2x2")
def _(input):
    _check(input)
    n, c, h, w = input.shape
    return input.new_empty((n, c, h // 2, w // 2)).contiguous(memory_format=_format(input))


@torch.library.register_fake("unet_ext::_max_pool2x2_backward")
def _(grad_out, input):
    _check(input)
    return torch.empty_like(input, memory_format=_format(input))


# Its autograd is in C++ (csrc/ops/conv2d_relu_autograd.cpp): a Python one cost ~0.1 ms a call.
