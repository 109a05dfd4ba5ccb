"""crop_concat(skip, up): centre-crop the skip connection to up's size and concatenate (dim 1)."""
import torch
from torch._prims_common import suggest_memory_format

__all__ = ["crop_concat"]


def crop_concat(skip: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``torch.cat([centre_crop(skip, up.shape[-2:]), up], dim=1)`` in one pass.

    skip: (N, Cs, Hs, Ws); up: (N, Cu, H, W) with H <= Hs, W <= Ws. The crop starts at
    ((Hs - H) // 2, (Ws - W) // 2). Returns (N, Cs + Cu, H, W), channels_last when both
    inputs are (torch.cat's rule). Differentiable in both inputs.
    """
    return torch.ops.unet_ext.crop_concat.default(skip, up)


def _check_shapes(skip, up):
    torch._check(skip.dim() == 4, lambda: f"unet_ext.crop_concat: skip must be a 4-D tensor, got {skip.dim()}-D")
    torch._check(up.dim() == 4, lambda: f"unet_ext.crop_concat: up must be a 4-D tensor, got {up.dim()}-D")
    torch._check(skip.dtype == up.dtype, lambda: "unet_ext.crop_concat: skip and up must have the same dtype")
    torch._check(skip.shape[0] == up.shape[0], lambda: "unet_ext.crop_concat: skip and up must have the same batch size")
    torch._check(up.shape[2] <= skip.shape[2] and up.shape[3] <= skip.shape[3],
                 lambda: "unet_ext.crop_concat: up's spatial size must not exceed skip's")


def _memory_format(*tensors):
    """The format the kernels allocate: channels_last iff every tensor suggests it (ATen's rule)."""
    channels_last = all(suggest_memory_format(t) == torch.channels_last for t in tensors)
    return torch.channels_last if channels_last else torch.contiguous_format


@torch.library.register_fake("unet_ext::crop_concat")
def _(skip, up):
    _check_shapes(skip, up)
    shape = (skip.shape[0], skip.shape[1] + up.shape[1], up.shape[2], up.shape[3])
    return skip.new_empty(shape).contiguous(memory_format=_memory_format(skip, up))


@torch.library.register_fake("unet_ext::_crop_concat_backward")
def _(grad_out, skip_channels, skip_height, skip_width):
    n, c, h, w = grad_out.shape
    fmt = _memory_format(grad_out)
    grad_skip = grad_out.new_empty((n, skip_channels, skip_height, skip_width)).contiguous(memory_format=fmt)
    grad_up = grad_out.new_empty((n, c - skip_channels, h, w)).contiguous(memory_format=fmt)
    return grad_skip, grad_up


def _setup_context(ctx, inputs, output):
    skip, _ = inputs
    ctx.skip_shape = skip.shape


def _backward(ctx, grad_out):
    _, channels, height, width = ctx.skip_shape
    grad_skip, grad_up = torch.ops.unet_ext._crop_concat_backward.default(
        grad_out, channels, height, width)
    return grad_skip, grad_up


torch.library.register_autograd("unet_ext::crop_concat", _backward, setup_context=_setup_context)
