"""A U-Net written the way milesial/Pytorch-UNet writes it (conv-BN-ReLU double convs in an
nn.Sequential, max-pool down, transposed-conv up, F.pad of the up-sampled map + torch.cat, 1x1
head): the "model people already have" of tests/test_convert.py and benchmarks/bench_convert.py."""
import torch
import torch.nn.functional as F
from torch import nn

class DoubleConv(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True))

    def forward(self, x):
        return self.double_conv(x)


class Down(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels))

    def forward(self, x):
        return self.maxpool_conv(x)


class Up(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
        self.conv = DoubleConv(in_channels, out_channels)

    def forward(self, x1, x2):
        x1 = self.up(x1)
        diff_y = x2.size()[2] - x1.size()[2]
        diff_x = x2.size()[3] - x1.size()[3]
        x1 = F.pad(x1, [diff_x // 2, diff_x - diff_x // 2, diff_y // 2, diff_y - diff_y // 2])
        return self.conv(torch.cat([x2, x1], dim=1))


class MilesialUNet(nn.Module):
    """depth levels of down/up (milesial's network: base 64, depth 4)."""

    def __init__(self, n_channels=3, n_classes=2, base=8, depth=2):
        super().__init__()
        channels = [base * 2 ** i for i in range(depth + 1)]
        self.inc = DoubleConv(n_channels, base)
        self.downs = nn.ModuleList(Down(c, 2 * c) for c in channels[:-1])
        self.ups = nn.ModuleList(Up(2 * c, c) for c in reversed(channels[:-1]))
        self.outc = nn.Conv2d(base, n_classes, kernel_size=1)

    def forward(self, x):
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for up in self.ups:
            x = up(x, skips.pop())
        return self.outc(x)
