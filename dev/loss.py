"""The loss workshop: weighted_cross_entropy forward variants (float32 NCHW, weight map, mean).

    python -m dev.loss [--device cpu|cuda] [--shape 4,2,388,388] [--sweep 64,128,256,512]

CPU: dev/loss_cpu.cpp (v1 per pixel; v2 the library's block kernel; v3 online logsumexp; v4 no
gather), sweep of B, the pixels per block. CUDA: dev/loss_cuda.cu (v1 thread per pixel with an
atomic per pixel; v2 block reduction; v3 grid-stride, capped grid), sweep of threads per block.
Every variant is validated against unet_ext.reference before it is timed; the library's op and
stock PyTorch are timed in the same rounds. Promotion: dev/README.md.
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
    "cpu": {1: "per pixel, strided classes, std::exp", 2: "library: gathered (C, B) blocks, two-pass",
            3: "v2 + online logsumexp", 4: "v2 without the gather (in place)"},
    "cuda": {1: "thread per pixel, two-pass, atomicAdd per pixel", 2: "online logsumexp, block reduction",
             3: "v2, grid-stride over a capped grid"},
}


class Loss:
    name = "weighted_cross_entropy forward"
    default_shape = (4, 2, 388, 388)
    setting_name = {"cpu": "B", "cuda": "threads"}
    sources = {"cpu": "loss_cpu.cpp", "cuda": "loss_cuda.cu"}
    swept = {"cpu": [2, 3, 4], "cuda": [1, 2, 3]}  # the variants that read the setting
    library_variant = {"cpu": 2}  # v2 is the library's CPU kernel (its headers, as built)
    sweep = {"cpu": [32, 64, 128, 256, 512, 1024, 2048], "cuda": [64, 128, 256, 512, 1024]}
    promotion = {"cpu": "B: kMaxBlock in csrc/ops/cpu/weighted_cross_entropy_block.h; v3: the "
                        "block_logsumexp line there",
                 "cuda": "threads: kThreads in csrc/ops/cuda/weighted_cross_entropy.cu"}

    def __init__(self, device, shape, threads):
        self.device, self.threads = device, threads
        self.variants = VARIANTS[device]
        n, c, h, w = shape
        gen = torch.Generator().manual_seed(0)
        self.logits = (torch.randn(n, c, h, w, generator=gen) * 3).to(device)
        target = torch.randint(0, c, (n, h, w), generator=gen)
        target[torch.rand(n, h, w, generator=gen) < 0.05] = -100
        self.target = target.to(device)
        self.weight = (torch.rand(n, h, w, generator=gen) * 10).to(device)
        self.n, self.c, self.s = n, c, h * w
        self.lse = torch.empty(n, h * w, device=device)
        self.sums = torch.zeros(2, dtype=torch.float64, device=device)
        self.bytes = self.logits.numel() * 4 + self.target.numel() * 8 + self.weight.numel() * 4 + self.lse.numel() * 4
        self.source = os.path.join(HERE, self.sources[device])
        self.defines = workshop.cpu_defines() if device == "cpu" else []

    def bind(self, lib):
        self.lib = lib
        if self.device == "cpu":
            self.fn = lib.wce_forward
            self.fn.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4 + \
                [ctypes.c_int] + [ctypes.c_void_p] * 2
            lib.library_block.restype = ctypes.c_int64
            self.library_setting = lib.library_block(ctypes.c_int64(self.c))
        else:
            self.fn = lib.wce_forward_cuda
            self.fn.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + \
                [ctypes.c_int] + [ctypes.c_void_p] * 2
            lib.library_threads.restype = ctypes.c_int
            self.library_setting = lib.library_threads()
        self.fn.restype = ctypes.c_int

    def run(self, variant, setting):
        p = harness.ptr
        if self.device == "cpu":
            rc = self.fn(variant, p(self.logits), p(self.target), p(self.weight), self.n, self.c, self.s,
                         setting, self.threads, p(self.lse), p(self.sums))
        else:
            rc = self.fn(variant, p(self.logits), p(self.target), p(self.weight), self.n, self.c, self.s,
                         setting, p(self.lse), p(self.sums))
        if rc != 0:
            raise RuntimeError(f"v{variant} with {setting}: error {rc}")

    def check(self, variant, setting):
        self.run(variant, setting)
        if self.device == "cuda":
            torch.cuda.synchronize()
        mean = self.sums[0] / self.sums[1]
        want = reference.weighted_cross_entropy(self.logits.double(), self.target, self.weight.double())
        harness.validate(f"v{variant} lse", self.lse, torch.logsumexp(self.logits.double(), 1).flatten(1),
                         rtol=1e-5, atol=1e-5)
        harness.validate(f"v{variant} loss", mean.reshape(1), want.reshape(1), rtol=2e-5, atol=1e-6)

    def library(self):
        return None if unet_ext is None else lambda: unet_ext.weighted_cross_entropy(self.logits, self.target, self.weight)

    def stock(self):
        return lambda: reference.weighted_cross_entropy(self.logits, self.target, self.weight)


def main(argv=None):
    return workshop.main(Loss, argv, prog="python -m dev.loss", doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
