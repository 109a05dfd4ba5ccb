"""The conv workshop: conv2d_relu forward variants (float32 NCHW, stride 1, valid, 3x3 by default).

    python -m dev.conv [--device cpu|cuda] [--shape N,Ci,H,W,Co,K] [--sweep 4x2,8x4,16x4]

CPU: dev/conv_cpu.cpp (v1 direct; v2 one output row at a time; v3 TCO channels x R rows per task),
sweep of v3's tile TCOxR. CUDA: dev/conv_cuda.cu (v1 thread per output; v2 shared-memory input
patch; v3 4 output channels per thread), sweep of TILE. Each variant is validated against
unet_ext.reference.conv2d_relu before it is timed, next to the library's op and stock PyTorch.
"""
import ctypes
import os
import sys

import torch

try:
    from . import harness, workshop
except ImportError:  # run as a script
    import harness
    import workshop

unet_ext, reference = harness.library()

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = {
    "cpu": {1: "direct, one output at a time", 2: "direct, one output row at a time (vectorised)",
            3: "v2 tiled: TCO channels x R rows per task"},
    "cuda": {1: "thread per output, global loads", 2: "shared-memory input patch, 1 channel per thread",
             3: "v2 with 4 output channels per thread"},
}


class Conv:
    name = "conv2d_relu forward"
    # U-Net's second level (a small one, for a quick CPU run): 64 -> 64 channels at 66x66, 3x3.
    default_shape = (1, 64, 66, 66, 64, 3)
    setting_name = {"cpu": "TCOxR", "cuda": "TILE"}
    sources = {"cpu": "conv_cpu.cpp", "cuda": "conv_cuda.cu"}
    swept = {"cpu": [3], "cuda": [1, 2, 3]}  # the variants that read the setting
    library_variant = {}  # the library's CPU conv is a brgemm implicit GEMM, not one of these
    sweep = {"cpu": ["1x1", "4x1", "4x4", "8x2", "8x4", "16x2", "16x4", "32x4"], "cuda": ["8", "16", "32"]}
    promotion = {"cpu": "a direct conv wins only where the library's GEMMs are short (few channels): "
                        "route those shapes to it in csrc/ops/cpu/conv2d_relu.cpp",
                 "cuda": "csrc/ops/cuda/conv2d_relu.cu's generic float32 kernel (kThreads, its tiling)"}

    def __init__(self, device, shape, threads):
        self.device, self.threads = device, threads
        self.variants = VARIANTS[device]
        n, ci, h, w, co, k = shape
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, ci, h, w, generator=gen).to(device)
        self.w = (torch.randn(co, ci, k, k, generator=gen) / (ci * k * k) ** 0.5).to(device)
        self.b = (torch.randn(co, generator=gen) * 0.1).to(device)
        self.y = torch.empty(n, co, h - k + 1, w - k + 1, device=device)
        self.dims = (n, ci, h, w, co, k)
        self.bytes = (self.x.numel() + self.w.numel() + self.y.numel()) * 4
        self.source = os.path.join(HERE, self.sources[device])
        self.defines = workshop.cpu_defines() if device == "cpu" else []
        self.library_setting = (8, 4) if device == "cpu" else 16

    @staticmethod
    def parse(text):
        return tuple(int(v) for v in text.split("x")) if "x" in text else int(text)

    def bind(self, lib):
        if self.device == "cpu":
            self.fn = lib.conv_forward
            self.fn.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 8 + [ctypes.c_int]
        else:
            self.fn = lib.conv_forward_cuda
            self.fn.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_int] * 7
        self.fn.restype = ctypes.c_int
        self.want = reference.conv2d_relu(self.x.double(), self.w.double(), self.b.double())

    def run(self, variant, setting):
        p = harness.ptr
        if self.device == "cpu":
            tco, rows = setting
            rc = self.fn(variant, p(self.x), p(self.w), p(self.b), p(self.y), *self.dims, tco, rows, self.threads)
        else:
            rc = self.fn(variant, p(self.x), p(self.w), p(self.b), p(self.y), *self.dims, setting)
        if rc != 0:
            raise RuntimeError(f"v{variant} with {setting}: error {rc}")

    def check(self, variant, setting):
        self.y.fill_(float("nan"))
        self.run(variant, setting)
        if self.device == "cuda":
            torch.cuda.synchronize()
        harness.validate(f"v{variant}", self.y, self.want, rtol=1e-4, atol=1e-4)

    def library(self):
        return None if unet_ext is None else lambda: unet_ext.conv2d_relu(self.x, self.w, self.b)

    def stock(self):
        return lambda: reference.conv2d_relu(self.x, self.w, self.b)


def main(argv=None):
    return workshop.main(Conv, argv, prog="python -m dev.conv", doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
