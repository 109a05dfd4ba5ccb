"""weighted_cross_entropy vs what users write without unet_ext,
``(F.cross_entropy(..., 'none') * w).mean()`` (reference.weighted_cross_entropy_unfused), eager and
torch.compile'd when not quick (compiling takes minutes on a small CPU, and a GPU lease's quick run
has no time for it).
Shapes: the paper's output map (4|8, 2, 388, 388) and a many-class (2, 21, 256, 256); fp32 (and bf16
on CUDA); and "bfloat16-autocast": bf16 logits under bf16 autocast, float32 loss on both sides
(ours reads the bf16 logits, stock casts them to float32 first). Bytes model: forward reads logits, target (int64) and weight map; forward+backward reads
them twice and writes grad_logits. The acceptance case is (4, 2, 388, 388) fp32 forward+backward.
"""
import math

import torch

from unet_ext import ops, reference

try:
    from .harness import OURS, Case, run_cases
except ImportError:  # run as a script
    from harness import OURS, Case, run_cases

SHAPES = [(4, 2, 388, 388), (8, 2, 388, 388), (2, 21, 256, 256)]
ACCEPTANCE = dict(op="weighted_cross_entropy", shape=str((4, 2, 388, 388)), dtype="float32",
                  mode="forward+backward", impl="stock")
# Losses are reductions over ~10^6 pixels and grads are ~1/pixels: relative tolerances only.
TOLERANCES = {torch.float32: dict(rtol=1e-3, atol=1e-9), torch.bfloat16: dict(rtol=5e-2, atol=1e-8)}

_compiled = None


def _compiled_reference():
    global _compiled
    if _compiled is None:
        # One compiled function serves every shape, dtype and mode (static shapes: one graph
        # each), so allow more recompiles than the default before dynamo falls back to eager.
        config = torch._dynamo.config
        setattr(config, "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit", 64)
        _compiled = torch.compile(reference.weighted_cross_entropy_unfused, dynamic=False)
    return _compiled


def _case(shape, dtype, mode, device, with_compile):
    n, c, *spatial = shape
    pixels = n * math.prod(spatial)
    size = torch.empty((), dtype=dtype).element_size()
    read = pixels * (c * size + 8 + size)  # logits, int64 target, weight map
    backward = mode == "forward+backward"

    def make():
        logits = torch.randn(shape, device=device, dtype=dtype)
        target = torch.randint(0, c, (n, *spatial), device=device)
        weight = (torch.rand((n, *spatial), device=device) + 0.5).to(dtype)
        impls = {OURS: ops.weighted_cross_entropy, "stock": reference.weighted_cross_entropy_unfused}
        if with_compile:
            impls["compile(stock)"] = _compiled_reference()
        if not backward:
            return {name: (lambda f=f: f(logits, target, weight)) for name, f in impls.items()}
        logits.requires_grad_()

        def step(f):
            loss = f(logits, target, weight)
            return loss.detach(), torch.autograd.grad(loss, logits)[0]
        return {name: (lambda f=f: step(f)) for name, f in impls.items()}

    return Case(op="weighted_cross_entropy", shape=str(tuple(shape)),
                dtype=str(dtype).replace("torch.", ""), layout="contiguous", mode=mode, make=make,
                bytes_moved=read * (2 if backward else 1) + (pixels * c * size if backward else 0),
                tol=TOLERANCES[dtype], no_memory=("compile(stock)",))



def _autocast_case(shape, mode, device):
    """bf16 logits (a bf16 network's output) under bf16 autocast, float32 weight map: both sides
    return a float32 loss; ours reads the bf16 logits in place, stock (F.cross_entropy's autocast
    policy) casts them to a float32 copy first. The gradient is bf16 on both sides."""
    n, c, *spatial = shape
    pixels = n * math.prod(spatial)
    backward = mode == "forward+backward"
    read = pixels * (c * 2 + 8 + 4)

    def make():
        logits = torch.randn(shape, device=device, dtype=torch.bfloat16)
        target = torch.randint(0, c, (n, *spatial), device=device)
        weight = torch.rand((n, *spatial), device=device) + 0.5

        def call(f):
            with torch.autocast(device, dtype=torch.bfloat16):
                return f(logits, target, weight)
        impls = {OURS: ops.weighted_cross_entropy, "stock": reference.weighted_cross_entropy_unfused}
        if not backward:
            return {name: (lambda f=f: call(f)) for name, f in impls.items()}
        logits.requires_grad_()

        def step(f):
            loss = call(f)
            return loss.detach(), torch.autograd.grad(loss, logits)[0]
        return {name: (lambda f=f: step(f)) for name, f in impls.items()}

    return Case(op="weighted_cross_entropy", shape=str(tuple(shape)), dtype="bfloat16-autocast",
                layout="contiguous", mode=mode, make=make,
                bytes_moved=read * (2 if backward else 1) + (pixels * c * 2 if backward else 0),
                tol=TOLERANCES[torch.bfloat16])


def cases(device, quick=False):
    with_compile = not quick
    dtypes = [torch.float32] + ([torch.bfloat16] if device == "cuda" else [])
    return ([_case(shape, dtype, mode, device, with_compile)
             for dtype in dtypes for mode in ("forward", "forward+backward") for shape in SHAPES] +
            [_autocast_case(shape, mode, device)
             for mode in ("forward", "forward+backward") for shape in (SHAPES[0], SHAPES[2])])


def run(device, quick=False, **timing):
    return run_cases(cases(device, quick), device, **timing)
