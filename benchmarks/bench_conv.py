"""conv2d_relu and conv_transpose2x2 against stock PyTorch (F.conv2d + relu, F.conv_transpose2d;
on CUDA also channels_last stock and torch.compile of it) at every layer shape of the paper's
572x572 U-Net, forward and forward+backward; conv2d_relu_concat (the decoder's first conv of each
level) also against our own crop_concat + conv2d_relu. FLOPs: 2*N*C_out*H_out*W_out*C_in*kh*kw forward,
3x with backward (2x where the input needs no gradient: the first layer). CPU runs batch 1 (the
quick run: the issue's acceptance shapes only); CUDA batch 1 and 8 in bf16 and fp32.
"""
import math

import torch
import torch.nn.functional as F

from unet_ext import ops, reference

try:
    from .harness import OURS, Case, run_cases
except ImportError:  # run as a script
    from harness import OURS, Case, run_cases

# (C_in, C_out, input size) of every 3x3 conv of the 572 network, encoder then decoder.
CONV_LAYERS = [(1, 64, 572), (64, 64, 570), (64, 128, 284), (128, 128, 282), (128, 256, 140),
               (256, 256, 138), (256, 512, 68), (512, 512, 66), (512, 1024, 32), (1024, 1024, 30),
               (1024, 512, 56), (512, 512, 54), (512, 256, 104), (256, 256, 102),
               (256, 128, 200), (128, 128, 198), (128, 64, 392), (64, 64, 390)]
# (C_in, C_out, input size) of the 2x2 up-convs.
UP_LAYERS = [(1024, 512, 28), (512, 256, 52), (256, 128, 100), (128, 64, 196)]
# (C_skip = C_up, skip size, up size) of the decoder's first conv of each level (C_out = C_skip).
CONCAT_LAYERS = [(512, 64, 56), (256, 136, 104), (128, 280, 200), (64, 568, 392)]
# The CPU bars (fp32, forward+backward): conv 64->64 at 2x64x130x130 at least as fast
# as stock, up-conv 256->128 at 2x256x34x34 at least 1.3x.
ACCEPTANCE = [("conv2d_relu", 2, 64, 64, 130, 1.0), ("conv_transpose2x2", 2, 256, 128, 34, 1.3)]
FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def _compiled(fn, cache={}):
    if fn not in cache:
        config = torch._dynamo.config
        setattr(config, "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit", 256)
        cache[fn] = torch.compile(fn, dynamic=False)
    return cache[fn]


def _tolerance(dtype, device):
    """16-bit: bf16-level; float32 on CUDA with torch.backends.cudnn.allow_tf32 (stock's default, which
    ours follows): both sides round operands to TF32 (10-bit mantissa), so they agree to ~1e-3 of
    the scale, not to float32's (the first H200 lease flagged every float32 wgrad at 1e-5);
    float32 elsewhere: float32-level."""
    if dtype in (torch.float16, torch.bfloat16):
        return dict(rtol=5e-2, atol_rel=5e-2)
    if dtype == torch.float32 and device == "cuda" and torch.backends.cudnn.allow_tf32:
        return dict(rtol=1e-2, atol_rel=5e-3)
    return dict(rtol=1e-3, atol_rel=1e-5)


def _case(op, batch, c_in, c_out, size, dtype, layout, mode, device, with_compile):
    up = op == "conv_transpose2x2"
    if up:
        x_shape, w_shape, out_hw = (batch, c_in, size, size), (c_in, c_out, 2, 2), 2 * size
        forward_flops = 2 * batch * size * size * c_in * c_out * 4
    else:
        x_shape, w_shape, out_hw = (batch, c_in, size, size), (c_out, c_in, 3, 3), size - 2
        forward_flops = 2 * batch * c_out * out_hw * out_hw * c_in * 9
    backward = mode == "forward+backward"
    input_grad = c_in > 1  # U-Net's first layer: the image needs no gradient
    flops = forward_flops * ((3 if input_grad else 2) if backward else 1)
    elem = torch.empty((), dtype=dtype).element_size()
    bytes_moved = (math.prod(x_shape) + math.prod(w_shape) + batch * c_out * out_hw * out_hw) * elem

    def make():
        fmt = FORMATS[layout]
        x = torch.randn(x_shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
        fan_in = c_in * (4 if up else 9)
        w = (torch.randn(w_shape, device=device) * (2 / fan_in) ** 0.5).to(dtype)
        b = torch.randn(c_out, device=device, dtype=dtype) * 0.1
        ours = ops.conv_transpose2x2 if up else (lambda x, w, b: ops.conv2d_relu(x, w, b, 0))
        stock = reference.conv_transpose2x2 if up else (lambda x, w, b: F.relu(F.conv2d(x, w, b)))
        impls = {OURS: ours, "stock": stock}
        if with_compile:
            impls["compile(stock)"] = _compiled(reference.conv_transpose2x2 if up else reference.conv2d_relu)
        if not backward:
            return {name: (lambda f=f: f(x, w, b)) for name, f in impls.items()}
        x.requires_grad_(input_grad)
        w.requires_grad_()
        b.requires_grad_()
        leaves = (x, w, b) if input_grad else (w, b)
        grad = torch.randn((batch, c_out, out_hw, out_hw), device=device, dtype=dtype).contiguous(memory_format=fmt)
        return {name: (lambda f=f: torch.autograd.grad(f(x, w, b), leaves, grad)) for name, f in impls.items()}

    tol = _tolerance(dtype, device)
    if backward and not up:
        tol["flips"] = 0.05  # ReLU-boundary pixels (one flip moves a whole row of grad_weight) (see harness._check); the tests check the mask exactly
    return Case(op=op, shape=f"{batch}x{c_in}x{size}x{size}->{c_out}", dtype=str(dtype).replace("torch.", ""),
                layout=layout, mode=mode, make=make, bytes_moved=bytes_moved, tol=tol,
                flops=flops, no_memory=("compile(stock)",))


def _concat_case(batch, c, skip_size, size, dtype, layout, mode, device):
    out_hw = size - 2
    backward = mode == "forward+backward"
    flops = 2 * batch * c * out_hw * out_hw * 2 * c * 9 * (3 if backward else 1)
    elem = torch.empty((), dtype=dtype).element_size()
    bytes_moved = (2 * batch * c * size * size + c * 2 * c * 9 + batch * c * out_hw * out_hw) * elem

    def make():
        fmt = FORMATS[layout]
        skip = torch.randn(batch, c, skip_size, skip_size, device=device, dtype=dtype).contiguous(memory_format=fmt)
        up = torch.randn(batch, c, size, size, device=device, dtype=dtype).contiguous(memory_format=fmt)
        w = (torch.randn(c, 2 * c, 3, 3, device=device) * (2 / (18 * c)) ** 0.5).to(dtype)
        b = torch.randn(c, device=device, dtype=dtype) * 0.1
        impls = {OURS: lambda: ops.conv2d_relu_concat(skip, up, w, b, 0),
                 "crop_concat+conv2d_relu": lambda: ops.conv2d_relu(ops.crop_concat(skip, up), w, b, 0),
                 "stock": lambda: reference.conv2d_relu_concat(skip, up, w, b, 0)}
        if not backward:
            return impls
        leaves = tuple(t.requires_grad_() for t in (skip, up, w, b))
        grad = torch.randn((batch, c, out_hw, out_hw), device=device, dtype=dtype).contiguous(memory_format=fmt)
        return {name: (lambda f=f: torch.autograd.grad(f(), leaves, grad)) for name, f in impls.items()}

    tol = _tolerance(dtype, device)
    if backward:
        tol["flips"] = 0.05  # as conv2d_relu's: ReLU-boundary pixels
    return Case(op="conv2d_relu_concat", shape=f"{batch}x{c}x{skip_size}+{c}x{size}->{c}",
                dtype=str(dtype).replace("torch.", ""), layout=layout, mode=mode, make=make,
                bytes_moved=bytes_moved, tol=tol, flops=flops)


def cases(device, quick=False):
    modes = ("forward", "forward+backward")
    result = []
    if device == "cpu":
        for op, batch, c_in, c_out, size, _ in ACCEPTANCE:
            result += [_case(op, batch, c_in, c_out, size, torch.float32, "contiguous", m, device, False) for m in modes]
        if quick:
            return result
        for c_in, c_out, size in CONV_LAYERS:
            result += [_case("conv2d_relu", 1, c_in, c_out, size, torch.float32, "contiguous", m, device, False) for m in modes]
        for c_in, c_out, size in UP_LAYERS:
            result += [_case("conv_transpose2x2", 1, c_in, c_out, size, torch.float32, "contiguous", m, device, False) for m in modes]
        for c, skip_size, size in CONCAT_LAYERS:
            result += [_concat_case(1, c, skip_size, size, torch.float32, "contiguous", m, device) for m in modes]
        return result
    batches = (1,) if quick else (1, 8)
    for dtype in (torch.bfloat16, torch.float32):
        for batch in batches:
            for c_in, c_out, size in CONV_LAYERS:
                result += [_case("conv2d_relu", batch, c_in, c_out, size, dtype, "channels_last", m, device, not quick) for m in modes]
            for c_in, c_out, size in UP_LAYERS:
                result += [_case("conv_transpose2x2", batch, c_in, c_out, size, dtype, "channels_last", m, device, not quick) for m in modes]
            for c, skip_size, size in CONCAT_LAYERS:
                result += [_concat_case(batch, c, skip_size, size, dtype, "channels_last", m, device) for m in modes]
    return result


def acceptance_lines(rows):
    lines = []
    for op, batch, c_in, c_out, size, bar in ACCEPTANCE:
        shape = f"{batch}x{c_in}x{size}x{size}->{c_out}"
        row = next((r for r in rows if r["op"] == op and r["shape"] == shape and r["impl"] == "stock"
                    and r["mode"] == "forward+backward" and r["dtype"] == "float32"), None)
        if row:
            verdict = "PASS" if row["speedup"] >= bar else "FAIL"
            lines.append(f"acceptance (cpu): {op} {shape} fp32 forward+backward: {row['speedup']:.2f}x "
                         f"vs stock (needs >= {bar}x): {verdict}")
    return lines


def run(device, quick=False, **timing):
    return run_cases(cases(device, quick), device, **timing)
