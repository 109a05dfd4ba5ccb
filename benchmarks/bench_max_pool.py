"""max_pool2x2 vs stock F.max_pool2d(x, 2) at the encoder's down-steps: the paper's 572x572 U-Net,
batch 1 (maps 568/280/136/64 with 64..512 channels), and the CPU training shape of the whole-model
benchmark (base 32, 316x316, batch 2: maps 312/152/72/32). Layouts: contiguous and channels_last;
fp32 (and bf16 on CUDA); forward and forward+backward.
Bytes model: forward reads the input and writes the output; backward reads grad_out and the
input (ours recomputes the argmax; stock reads its int64 indices instead) and writes grad_input.
"""
import math

import torch
import torch.nn.functional as F

from unet_ext import ops

try:
    from .harness import OURS, Case, run_cases
except ImportError:  # run as a script
    from harness import OURS, Case, run_cases

SHAPES = [(1, 64, 568, 568), (1, 128, 280, 280), (1, 256, 136, 136), (1, 512, 64, 64),
          (2, 32, 312, 312), (2, 64, 152, 152), (2, 128, 72, 72), (2, 256, 32, 32)]
FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def _stock(x):
    return F.max_pool2d(x, 2)


def _case(shape, dtype, layout, mode, device):
    n, c, h, w = shape
    size = torch.empty((), dtype=dtype).element_size()
    pooled = n * c * (h // 2) * (w // 2)
    forward_bytes = (math.prod(shape) + pooled) * size
    backward_bytes = (pooled + 2 * math.prod(shape)) * size
    backward = mode == "forward+backward"

    def make():
        x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=FORMATS[layout])
        impls = {OURS: ops.max_pool2x2, "stock": _stock}
        if not backward:
            return {name: (lambda f=f: f(x)) for name, f in impls.items()}
        x.requires_grad_()
        grad_out = torch.randn(n, c, h // 2, w // 2, device=device, dtype=dtype).contiguous(
            memory_format=FORMATS[layout])
        return {name: (lambda f=f: torch.autograd.grad(f(x), x, grad_out)) for name, f in impls.items()}

    return Case(op="max_pool2x2", shape=str(tuple(shape)), dtype=str(dtype).replace("torch.", ""),
                layout=layout, mode=mode, make=make,
                bytes_moved=forward_bytes + (backward_bytes if backward else 0),
                tol=dict(rtol=0, atol=0))  # a max: bit-exact


def cases(device, quick=False):
    dtypes = [torch.float32] + ([torch.bfloat16] if device == "cuda" else [])
    shapes = SHAPES[4:] if quick else SHAPES
    return [_case(shape, dtype, layout, mode, device)
            for dtype in dtypes for layout in FORMATS for mode in ("forward", "forward+backward")
            for shape in shapes]


def run(device, quick=False, **timing):
    return run_cases(cases(device, quick), device, **timing)
