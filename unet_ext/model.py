"""unet_ext.UNet: the 2015 U-Net (Ronneberger, Fischer, Brox) on the fused kernels, and the
skeleton it shares with the stock-layer reference (unet_ext.reference.UNet): the same modules
under the same names, so state_dicts move both ways. Levels: two 3x3 conv+ReLU each, 2x2
max-pool down, 2x2 up-conv, skip merge (centre crop in "valid" mode, pad of the up-sampled
map in "same" mode), two 3x3 conv+ReLU, 1x1 head. The fused UNet runs each decoder level's
merge and first conv as one op (conv2d_relu_concat: no concatenated activation).
"""
import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import nn as fused
from . import ops
from ._unet_shape import check_input_size, output_size, valid_input_size

__all__ = ["UNet"]

PADDINGS = ("valid", "same")


class DoubleConv(nn.Module):
    def __init__(self, conv_relu, in_channels, out_channels, padding):
        super().__init__()
        self.conv1 = conv_relu(in_channels, out_channels, padding)
        self.conv2 = conv_relu(out_channels, out_channels, padding)

    def forward(self, x):
        return self.conv2(self.conv1(x))


class UpBlock(nn.Module):
    def __init__(self, conv_relu, up_conv, in_channels, out_channels, padding):
        super().__init__()
        self.up = up_conv(in_channels, out_channels)
        self.conv1 = conv_relu(in_channels, out_channels, padding)
        self.conv2 = conv_relu(out_channels, out_channels, padding)


def pad_to(up, skip):
    """Pads the up-sampled map to the skip's size ("same" mode with odd sizes)."""
    dh, dw = skip.shape[-2] - up.shape[-2], skip.shape[-1] - up.shape[-1]
    if dh or dw:
        up = F.pad(up, [dw // 2, dw - dw // 2, dh // 2, dh - dh // 2])
    return up


class UNetBase(nn.Module):
    """The network, given layer constructors: conv_relu(in, out, padding), up_conv(in, out),
    head(in, out), and merge(skip, up) -> concatenation. Each decoder level's first conv runs
    through merge_conv(block.conv1, skip, up), by default conv1(merge(skip, up)); subclasses
    may fuse the two (the weights stay in block.conv1 either way). pool(x) is the 2x2 max-pool
    down-step (stock F.max_pool2d here)."""

    def __init__(self, in_channels, num_classes, base_channels, depth, padding, dropout,
                 conv_relu, up_conv, head, merge, checkpointing=False):
        super().__init__()
        # Recompute each level's activations in the backward instead of keeping them (large tiles).
        self.checkpointing = checkpointing
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
        if depth < 1 or base_channels < 1 or in_channels < 1 or num_classes < 1:
            raise ValueError("depth, base_channels, in_channels and num_classes must be >= 1")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.in_channels, self.num_classes = in_channels, num_classes
        self.base_channels, self.depth, self.padding = base_channels, depth, padding
        conv_padding = 1 if padding == "same" else 0
        channels = [base_channels * 2 ** i for i in range(depth + 1)]
        self.encoder = nn.ModuleList(
            DoubleConv(conv_relu, c_in, c_out, conv_padding)
            for c_in, c_out in zip([in_channels] + channels[:-1], channels))
        self.dropout = nn.Dropout(dropout)  # end of the contracting path, as the paper
        self.decoder = nn.ModuleList(
            UpBlock(conv_relu, up_conv, channels[i + 1], channels[i], conv_padding)
            for i in reversed(range(depth)))
        self.head = head(channels[0], num_classes)
        self._merge = merge

    def pool(self, x):
        """The down-step between encoder levels: 2x2 max-pool, stride 2."""
        return F.max_pool2d(x, 2)

    def merge_conv(self, conv, skip, up):
        """The decoder's first conv of a level on the merged maps: conv(merge(skip, up))."""
        return conv(self._merge(skip, up))

    def output_size(self, size):
        """Output height/width for an input of `size` (ValueError if it does not fit)."""
        return output_size(size, self.depth, self.padding)

    def valid_input_size(self, size):
        """The smallest input size >= size that this network accepts."""
        return valid_input_size(size, self.depth, self.padding)

    def forward(self, x):
        if x.dim() != 4:
            raise ValueError(f"UNet expects (N, C, H, W) input, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"UNet expects {self.in_channels} input channels, got {x.shape[1]}")
        for size in x.shape[-2:]:
            if not isinstance(size, torch.SymInt):  # symbolic under torch.export: its dims say which
                check_input_size(int(size), self.depth, self.padding)
        recompute = self.checkpointing and torch.is_grad_enabled()
        layout = self.level_layout(x)

        def run(fn, *args):
            return checkpoint(fn, *args, use_reentrant=False) if recompute else fn(*args)

        skips = []
        for level, block in enumerate(self.encoder):
            x = run(block, layout(x, block.conv2.in_channels))
            if level < self.depth:
                skips.append(x)
                x = self.pool(x)
        x = self.dropout(x)
        for block, skip in zip(self.decoder, reversed(skips)):
            up = block.up(layout(x, block.conv2.in_channels))  # the skip is in that layout already
            if self.padding == "same":
                up = pad_to(up, skip)
            x = run(lambda s, u, b=block: b.conv2(self.merge_conv(b.conv1, s, u)), skip, up)
        return layout(self.head(x), None)

    def level_layout(self, x):
        """layout(t, channels): t in the memory format a level of `channels` channels runs in
        (channels None: the output, in x's); here every level runs as it comes."""
        return lambda t, channels: t


def _bf16_onednn_available():
    try:
        return (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
                and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))
    except (AttributeError, RuntimeError):
        return False


_BF16_ONEDNN = _bf16_onednn_available()
# csrc/ops/cpu/conv2d_kernel.h's threshold (the kernels read it per call; the model at import).
_BF16_ONEDNN_CHANNELS = int(os.environ.get("UNET_EXT_BF16_ONEDNN_CHANNELS", 0))


def _cpu_bf16_channels_last_pays(x):
    """Whether the fused UNet runs a CPU bf16 pass (bf16 input, or bf16 autocast) channels_last:
    where oneDNN has bf16 dot products and the input is not channels_last already."""
    if x.device.type != "cpu" or not _BF16_ONEDNN or not torch.backends.mkldnn.enabled:
        return False
    bf16 = x.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cpu")
                                         and torch.get_autocast_dtype("cpu") == torch.bfloat16)
    # NCHW (a 1-channel NCHW tensor is channels_last-contiguous too: its channel stride says).
    return bf16 and x.is_contiguous() and x.dim() == 4 and x.stride(1) != 1


def _channels_last(x):
    # Not x.contiguous(memory_format=...): that keeps a 1-channel NCHW tensor as it is, whose
    # layout the kernels then read as NCHW.
    return torch.empty_like(x, memory_format=torch.channels_last).copy_(x)


class UNet(UNetBase):
    """The paper's U-Net on unet_ext's fused kernels; a drop-in nn.Module.

    Defaults give the paper's network (31,030,658 parameters; 572x572 in, 388x388 out).
    padding="same" keeps the input's size (any size >= 2**depth). dropout applies at the end of
    the contracting path (the paper used 0.5 there). He initialisation. checkpointing=True
    recomputes each level's activations during the backward (less memory for large tiles).
    """

    def __init__(self, in_channels=1, num_classes=2, base_channels=64, depth=4, padding="valid",
                 dropout=0.0, checkpointing=False):
        super().__init__(
            in_channels, num_classes, base_channels, depth, padding, dropout,
            conv_relu=lambda i, o, p: fused.Conv2dReLU(i, o, 3, p),
            up_conv=fused.UpConv2x2,
            head=lambda i, o: fused.Conv2dBias(i, o, 1),
            merge=ops.crop_concat, checkpointing=checkpointing)

    def level_layout(self, x):
        # bf16 on a CPU with bf16 dot products: convolutions run on oneDNN (all by default),
        # which reorders an NCHW activation to nhwc and back at each one (as stock's does), so
        # the levels whose convolutions are there (from UNET_EXT_BF16_ONEDNN_CHANNELS channels)
        # run channels_last; the shallow ones stay NCHW, the layout of our kernels there. One
        # conversion per level boundary (after a pool, before an up-conv); NCHW comes back NCHW.
        if not _cpu_bf16_channels_last_pays(x):
            return super().level_layout(x)
        threshold = _BF16_ONEDNN_CHANNELS

        def layout(t, channels):
            if channels is None:
                return t.contiguous()
            if channels >= threshold:
                return t if t.stride(1) == 1 else _channels_last(t)
            return t.contiguous()
        return layout

    def pool(self, x):
        # Stock's max_pool2d keeps an int64 index per output for the backward and runs at ~1 GB/s
        # on the CPU; ours keeps nothing (the argmax is recomputed from x, which conv2 keeps anyway).
        return ops.max_pool2x2(x)

    def merge_conv(self, conv, skip, up):
        # One kernel reads the skip's crop window and the up map: no concatenated activation
        # (in "same" mode up is padded to the skip's size, so the crop offset is 0).
        return ops.conv2d_relu_concat(skip, up, conv.weight, conv.bias, conv.padding)
