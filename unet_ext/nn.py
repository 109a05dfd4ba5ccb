"""torch.nn layers on the fused ops, for users who build their own networks: constructor
arguments and parameter names follow torch.nn (Conv2d, ConvTranspose2d, CrossEntropyLoss), so
state_dicts move between these and the stock layers."""
import math
from typing import Optional

import torch
from torch import nn

from . import ops

__all__ = ["Conv2dReLU", "Conv2dBias", "UpConv2x2", "CropConcat", "MaxPool2x2", "WeightedCrossEntropyLoss"]


class _ConvBase(nn.Module):
    relu = True

    def __init__(self, in_channels, out_channels, kernel_size=3, padding=0, bias=True,
                 device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.padding = int(padding)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        # He initialisation (std sqrt(2 / fan_in)), as the U-Net paper; zero bias.
        fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        nn.init.normal_(self.weight, 0.0, math.sqrt(2.0 / fan_in))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x):
        op = ops.conv2d_relu if self.relu else ops.conv2d_bias
        return op(x, self.weight, self.bias, self.padding)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"padding={self.padding}, bias={self.bias is not None}")


class Conv2dReLU(_ConvBase):
    """``relu(conv2d(x))``, stride 1, fused (``nn.Conv2d`` + ``nn.ReLU``, same parameters)."""
    relu = True


class Conv2dBias(_ConvBase):
    """``conv2d(x) + bias`` on the same kernel with the ReLU off (U-Net's 1x1 head)."""
    relu = False


class UpConv2x2(nn.Module):
    """The 2x2 stride-2 up-convolution (``nn.ConvTranspose2d(in, out, 2, stride=2)``)."""

    def __init__(self, in_channels, out_channels, bias=True, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.weight = nn.Parameter(torch.empty(in_channels, out_channels, 2, 2, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        # Each output pixel sees C_in inputs through one tap: fan_in = C_in.
        nn.init.normal_(self.weight, 0.0, math.sqrt(2.0 / self.in_channels))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x):
        return ops.conv_transpose2x2(x, self.weight, self.bias)

    def extra_repr(self):
        return f"{self.in_channels}, {self.out_channels}, bias={self.bias is not None}"


class CropConcat(nn.Module):
    """``cat([centre_crop(skip, up.shape[-2:]), up], 1)``."""

    def forward(self, skip, up):
        return ops.crop_concat(skip, up)


class MaxPool2x2(nn.Module):
    """``nn.MaxPool2d(2)`` on unet_ext.ops.max_pool2x2 (no index tensor kept for the backward)."""

    def forward(self, input):
        return ops.max_pool2x2(input)


class WeightedCrossEntropyLoss(nn.Module):
    """The paper's pixel-wise weighted cross-entropy: ``loss(logits, target, weight_map=None)``.
    ``weight`` is the per-class weight (as ``nn.CrossEntropyLoss``)."""

    def __init__(self, weight: Optional[torch.Tensor] = None, ignore_index: int = -100,
                 reduction: str = "mean"):
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index, self.reduction = ignore_index, reduction

    def forward(self, logits, target, weight_map=None):
        return ops.weighted_cross_entropy(logits, target, weight_map, self.weight,
                                          self.ignore_index, self.reduction)
