"""crop_concat vs stock slice + torch.cat (unet_ext.reference.crop_concat) at the decoder levels of
the paper's 572x572 U-Net, batch 1: skip maps 64/136/280/568 cropped to up maps 56/104/200/392.
Layouts: contiguous and channels_last; fp32 (and bf16 on CUDA); forward and forward+backward.
Bytes model: forward reads the crop and up, writes the output; backward reads grad_out and writes
the whole grad_skip (zeros outside the crop) and grad_up.
"""
import math

import torch

from unet_ext import ops, reference

try:
    from .harness import OURS, Case, run_cases
except ImportError:  # run as a script
    from harness import OURS, Case, run_cases

# (skip, up) per decoder level, deepest first: (N, C, Hs, Ws) -> (N, C, H, W).
LEVELS = [((1, 512, 64, 64), (1, 512, 56, 56)),
          ((1, 256, 136, 136), (1, 256, 104, 104)),
          ((1, 128, 280, 280), (1, 128, 200, 200)),
          ((1, 64, 568, 568), (1, 64, 392, 392))]
FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}



def _case(skip_shape, up_shape, dtype, layout, mode, device):
    n, cs, _, _ = skip_shape
    _, cu, h, w = up_shape
    out_shape = (n, cs + cu, h, w)
    size = torch.empty((), dtype=dtype).element_size()
    forward_bytes = 2 * math.prod(out_shape) * size
    backward_bytes = (math.prod(out_shape) + math.prod(skip_shape) + math.prod(up_shape)) * size
    backward = mode == "forward+backward"

    def make():
        fmt = FORMATS[layout]
        skip = torch.randn(skip_shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
        up = torch.randn(up_shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
        impls = {OURS: ops.crop_concat, "stock": reference.crop_concat}
        if not backward:
            return {name: (lambda f=f: f(skip, up)) for name, f in impls.items()}
        skip.requires_grad_()
        up.requires_grad_()
        grad_out = torch.randn(out_shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
        return {name: (lambda f=f: torch.autograd.grad(f(skip, up), (skip, up), grad_out))
                for name, f in impls.items()}

    shape = f"{tuple(skip_shape)}->{tuple(up_shape)}"
    return Case(op="crop_concat", shape=shape, dtype=str(dtype).replace("torch.", ""),
                layout=layout, mode=mode, make=make,
                bytes_moved=forward_bytes + (backward_bytes if backward else 0),
                tol=dict(rtol=0, atol=0))  # a copy: bit-exact


def cases(device, quick=False):
    dtypes = [torch.float32] + ([torch.bfloat16] if device == "cuda" else [])
    return [_case(skip, up, dtype, layout, mode, device)
            for dtype in dtypes for layout in FORMATS for mode in ("forward", "forward+backward")
            for skip, up in LEVELS]


def run(device, quick=False, **timing):
    return run_cases(cases(device, quick), device, **timing)
