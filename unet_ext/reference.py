"""Plain-PyTorch references of every unet_ext op: the oracle of the tests and the baseline of
the benchmarks (the benchmarks import them from here, so both measure the same thing)."""
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["UNet", "conv2d_relu", "conv2d_bias", "conv2d_relu_concat", "conv_transpose2x2", "centre_crop", "crop_concat", "weighted_cross_entropy", "weighted_cross_entropy_unfused"]


def conv2d_relu(input, weight, bias=None, padding: int = 0):
    return F.relu(F.conv2d(input, weight, bias, padding=padding))


def conv2d_bias(input, weight, bias=None, padding: int = 0):
    return F.conv2d(input, weight, bias, padding=padding)


def conv_transpose2x2(input, weight, bias=None):
    return F.conv_transpose2d(input, weight, bias, stride=2)


def centre_crop(x: torch.Tensor, size) -> torch.Tensor:
    """Centre crop of the last two dims to ``size`` (offset (H - h) // 2, (W - w) // 2)."""
    height, width = size
    top = (x.shape[-2] - height) // 2
    left = (x.shape[-1] - width) // 2
    return x[..., top:top + height, left:left + width]


def crop_concat(skip: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.cat([centre_crop(skip, up.shape[-2:]), up], dim=1)


def conv2d_relu_concat(skip, up, weight, bias=None, padding: int = 0):
    """The decoder's first conv on the materialised concatenation."""
    return conv2d_relu(crop_concat(skip, up), weight, bias, padding)


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                           weight_map: Optional[torch.Tensor] = None,
                           class_weight: Optional[torch.Tensor] = None,
                           ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """Same semantics as unet_ext.ops.weighted_cross_entropy, from F.cross_entropy."""
    per_pixel = F.cross_entropy(logits, target, weight=class_weight, ignore_index=ignore_index,
                                reduction="none")
    if weight_map is not None:
        per_pixel = per_pixel * weight_map
    if reduction == "none":
        return per_pixel
    if reduction == "sum":
        return per_pixel.sum()
    kept = target != ignore_index
    if class_weight is None:
        denominator = kept.sum()
    else:
        denominator = (class_weight[torch.where(kept, target, 0)] * kept).sum()
    return per_pixel.sum() / denominator


def weighted_cross_entropy_unfused(logits, target, weight_map):
    """What users write without unet_ext: ``(F.cross_entropy(..., 'none') * w).mean()``."""
    return (F.cross_entropy(logits, target, reduction="none") * weight_map).mean()


class _StockConvReLU(torch.nn.Conv2d):
    """nn.Conv2d followed by a ReLU: the parameters are the Conv2d's own (weight, bias), so the
    keys match unet_ext.nn.Conv2dReLU."""

    def __init__(self, in_channels, out_channels, padding):
        super().__init__(in_channels, out_channels, 3, padding=padding)
        _he_init(self)

    def forward(self, x):
        return torch.relu(super().forward(x))


def _he_init(module):
    fan_in = module.weight.shape[1] * module.weight.shape[2] * module.weight.shape[3]
    if isinstance(module, torch.nn.ConvTranspose2d):
        fan_in = module.weight.shape[0]
    torch.nn.init.normal_(module.weight, 0.0, (2.0 / fan_in) ** 0.5)
    torch.nn.init.zeros_(module.bias)


def _stock_up(in_channels, out_channels):
    up = torch.nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
    _he_init(up)
    return up


def _stock_head(in_channels, out_channels):
    head = torch.nn.Conv2d(in_channels, out_channels, 1)
    _he_init(head)
    return head


def _stock_merge(skip, up):
    return torch.cat([centre_crop(skip, up.shape[-2:]), up], dim=1)


def UNet(in_channels=1, num_classes=2, base_channels=64, depth=4, padding="valid", dropout=0.0):
    """unet_ext.UNet from stock torch.nn layers only (Conv2d, ConvTranspose2d, ReLU, MaxPool2d,
    Dropout): the same state_dict keys and shapes, so weights move both ways."""
    from .model import UNetBase
    return UNetBase(in_channels, num_classes, base_channels, depth, padding, dropout,
                    conv_relu=_StockConvReLU, up_conv=_stock_up, head=_stock_head,
                    merge=_stock_merge)
