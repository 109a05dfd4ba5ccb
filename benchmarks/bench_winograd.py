"""The CPU Winograd F(4x4, 3x3) path against our direct path (allow_winograd off) and stock PyTorch
eager (F.conv2d + relu, oneDNN), float32, interleaved in the same run (medians): every 3x3 layer
of the paper's 572 network at batch 1 (conv2d_relu; the decoder's first conv of each level as
conv2d_relu_concat), forward and forward+backward, with the effective GFLOP/s (direct-convolution
FLOPs / time) next to the measured FMA peak (a large float32 torch.mm on the same threads); and
the whole model (benchmarks/bench_unet.py's cases: inference 572 base 64, training step base 32
2x316x316), where "wgrad direct" is Winograd with the weight gradient on the direct path (the
path before Winograd wgrad). ``--wgrad``: the weight gradient alone per paper layer (Winograd,
the direct path, stock), with its max error against float64 as a multiple of stock float32's.
``python -m benchmarks.bench_winograd [--layers] [--wgrad] [--model] [--rounds N] [--only I,J]``.
"""
import argparse
import contextlib
import os
import statistics
import time

import torch
import torch.nn.functional as F

import unet_ext
from unet_ext import ops, reference

try:
    from .bench_conv import CONCAT_LAYERS, CONV_LAYERS
except ImportError:  # run as a script
    from bench_conv import CONCAT_LAYERS, CONV_LAYERS

WINO, DIRECT, STOCK, WGRAD_DIRECT = "winograd", "direct", "stock", "wgrad direct"
# The selection rule's channel scale for wgrad, read per call (cpu/winograd.cpp): a value no layer
# meets sends every weight gradient to the direct path.
WGRAD_SCALE = "UNET_EXT_WINOGRAD_WGRAD_SCALE"


@contextlib.contextmanager
def _wgrad_direct():
    previous = os.environ.get(WGRAD_SCALE)
    os.environ[WGRAD_SCALE] = str(1 << 40)
    try:
        yield
    finally:
        if previous is None:
            del os.environ[WGRAD_SCALE]
        else:
            os.environ[WGRAD_SCALE] = previous


def fma_peak_gflops(n=2048, rounds=5):
    """float32 GEMM rate of torch.mm (MKL/oneDNN at its best: the practical FMA peak here)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def _switch(fn, allow):
    def run():
        with unet_ext.backends.cpu.flags(allow_winograd=allow):
            return fn()
    return run


def layer_fns(c_in, c_out, size, backward, concat_skip=None):
    torch.manual_seed(0)
    out_hw = size - 2
    if concat_skip is None:
        x = torch.randn(1, c_in, size, size)
        inputs = (x,)
    else:
        inputs = (torch.randn(1, c_in // 2, concat_skip, concat_skip), torch.randn(1, c_in // 2, size, size))
    w = torch.randn(c_out, c_in, 3, 3) * (2 / (9 * c_in)) ** 0.5
    b = torch.randn(c_out) * 0.1
    if concat_skip is None:
        ours = lambda: ops.conv2d_relu(inputs[0], w, b, 0)
        stock = lambda: F.relu(F.conv2d(inputs[0], w, b))
    else:
        ours = lambda: ops.conv2d_relu_concat(*inputs, w, b, 0)
        stock = lambda: reference.conv2d_relu_concat(*inputs, w, b, 0)
    if backward:
        input_grad = c_in > 1
        for t in inputs:
            t.requires_grad_(input_grad)
        w.requires_grad_()
        b.requires_grad_()
        leaves = (*inputs, w, b) if input_grad else (w, b)
        grad = torch.randn(1, c_out, out_hw, out_hw)
        ours_fwd, stock_fwd = ours, stock
        ours = lambda: torch.autograd.grad(ours_fwd(), leaves, grad)
        stock = lambda: torch.autograd.grad(stock_fwd(), leaves, grad)
    flops = 2 * c_out * out_hw * out_hw * c_in * 9 * ((3 if c_in > 1 else 2) if backward else 1)
    return {WINO: _switch(ours, True), DIRECT: _switch(ours, False), STOCK: stock}, flops


def time_fns(fns, rounds):
    for fn in fns.values():  # warm-up (filter caches, scratch, oneDNN primitives)
        fn()
    times = {name: [] for name in fns}
    for r in range(rounds):  # the order reversed every other round: no variant always follows the same one
        for name, fn in (list(fns.items()) if r % 2 == 0 else list(fns.items())[::-1]):
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def layers(rounds, only=None):
    peak = fma_peak_gflops()
    print(f"measured FMA peak (float32 torch.mm 2048^3, {torch.get_num_threads()} threads): {peak:.0f} GFLOP/s")
    print("| layer | mode | winograd ms | direct ms | stock ms | wino/stock | wino/direct | wino eff. GFLOP/s | direct GFLOP/s | stock GFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for i, (label, c_in, c_out, size, skip) in enumerate(_paper_specs()):
        if only is not None and i not in only:
            continue
        for backward in (False, True):
            fns, flops = layer_fns(c_in, c_out, size, backward, skip)
            t = time_fns(fns, rounds)
            g = {k: flops / v / 1e6 for k, v in t.items()}
            mode = "fwd+bwd" if backward else "fwd"
            rows.append((label, mode, t))
            print(f"| {label} | {mode} | {t[WINO]:.1f} | {t[DIRECT]:.1f} | {t[STOCK]:.1f} | {t[STOCK] / t[WINO]:.2f}x | "
                  f"{t[DIRECT] / t[WINO]:.2f}x | {g[WINO]:.0f} | {g[DIRECT]:.0f} | {g[STOCK]:.0f} |", flush=True)
    return rows


def _paper_specs():
    specs = [(f"conv {c_in}->{c_out} @{size}", c_in, c_out, size, None) for c_in, c_out, size in CONV_LAYERS]
    return specs + [(f"concat {c}+{c}->{c} @{size} (skip {skip})", 2 * c, c, size, skip) for c, skip, size in CONCAT_LAYERS]


def wgrad(rounds, only=None):
    """The weight (and bias) gradient alone, batch 1: the registered backward ops with only those
    outputs asked for, against stock's convolution_backward on the ReLU-masked gradient."""
    print("| layer | winograd ms | direct ms | stock ms | wino/direct | wino/stock | wino eff. GFLOP/s | max error / stock's: winograd, direct |")
    print("|---|---|---|---|---|---|---|---|")
    aten = torch.ops.aten
    for i, (label, c_in, c_out, size, skip) in enumerate(_paper_specs()):
        if only is not None and i not in only or c_in == 1:
            continue
        torch.manual_seed(0)
        w = torch.randn(c_out, c_in, 3, 3) * (2 / (9 * c_in)) ** 0.5
        if skip is None:
            inputs = (torch.randn(1, c_in, size, size),)
            x = inputs[0]
        else:
            inputs = (torch.randn(1, c_in // 2, skip, skip), torch.randn(1, c_in // 2, size, size))
            x = reference.crop_concat(*inputs)
        out = F.conv2d(x, w, torch.randn(c_out) * 0.1).relu()
        grad = torch.randn_like(out)
        if skip is None:
            ours = lambda: torch.ops.unet_ext._conv2d_backward(grad, x, w, out, 0, [False, True, True])[1]
        else:
            ours = lambda: torch.ops.unet_ext._conv2d_relu_concat_backward(grad, *inputs, w, out, 0,
                                                                           [False, False, True, True])[2]

        def stock(g=grad, o=out, xx=x, ww=w):
            return aten.convolution_backward(aten.threshold_backward(g, o, 0), xx, ww, [c_out], [1, 1], [0, 0], [1, 1],
                                             False, [0, 0], 1, [False, True, True])[1]

        def direct():
            with _wgrad_direct():
                return ours()
        fns = {WINO: ours, DIRECT: direct, STOCK: stock}
        exact = stock(grad.double(), out.double(), x.double(), w.double())
        err = {k: (fn().double() - exact).abs().max().item() for k, fn in fns.items()}
        t = time_fns(fns, rounds)
        flops = 2 * c_out * c_in * 9 * (size - 2) ** 2
        print(f"| {label} | {t[WINO]:.1f} | {t[DIRECT]:.1f} | {t[STOCK]:.1f} | {t[DIRECT] / t[WINO]:.2f}x | "
              f"{t[STOCK] / t[WINO]:.2f}x | {flops / t[WINO] / 1e6:.0f} | {err[WINO] / err[STOCK]:.2f}, "
              f"{err[DIRECT] / err[STOCK]:.2f} |", flush=True)


def model(rounds):
    for train, base, size, batch in ((False, 64, 572, 1), (True, 32, 316, 2)):
        torch.manual_seed(0)
        ours = unet_ext.UNet(base_channels=base)
        stock = reference.UNet(base_channels=base)
        stock.load_state_dict(ours.state_dict())
        x = torch.randn(batch, 1, size, size)
        out = ours.output_size(size)
        target = torch.randint(0, 2, (batch, out, out))
        weight = torch.rand(batch, out, out) + 0.5
        opts = {m: torch.optim.SGD(model_.parameters(), lr=1e-6, momentum=0.99)
                for m, model_ in ((WINO, ours), (DIRECT, ours), (STOCK, stock))}

        def step(name):
            m = stock if name == STOCK else ours
            if not train:
                with torch.no_grad():
                    return m(x)
            loss_fn = reference.weighted_cross_entropy_unfused if name == STOCK else unet_ext.weighted_cross_entropy
            loss = loss_fn(m(x), target, weight)
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            opts[name].step()
            return loss.detach()
        opts[WGRAD_DIRECT] = opts[WINO]

        def step_wgrad_direct():
            with _wgrad_direct():
                return step(WGRAD_DIRECT)
        fns = {WINO: _switch(lambda: step(WINO), True), DIRECT: _switch(lambda: step(DIRECT), False),
               STOCK: lambda: step(STOCK)}
        if train:
            fns[WGRAD_DIRECT] = _switch(step_wgrad_direct, True)
        t = time_fns(fns, rounds)
        label = f"{'training step' if train else 'inference'} base {base} {batch}x{size}x{size}"
        extra = (f", wgrad direct {t[WGRAD_DIRECT]:.0f} ms: {t[WGRAD_DIRECT] / t[WINO]:.2f}x that,"
                 f" which is {t[STOCK] / t[WGRAD_DIRECT]:.2f}x stock") if train else ""
        print(f"{label}: winograd {t[WINO]:.0f} ms, direct {t[DIRECT]:.0f} ms, stock {t[STOCK]:.0f} ms: "
              f"{t[STOCK] / t[WINO]:.2f}x stock, {t[DIRECT] / t[WINO]:.2f}x direct{extra} "
              f"(load {os.getloadavg()[0]:.1f})", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", action="store_true")
    parser.add_argument("--wgrad", action="store_true")
    parser.add_argument("--model", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", type=lambda s: {int(v) for v in s.split(",")}, default=None)
    args = parser.parse_args()
    everything = not (args.layers or args.wgrad or args.model)
    if args.layers or everything:
        layers(args.rounds, args.only)
    if args.wgrad or everything:
        wgrad(args.rounds, args.only)
    if args.model or everything:
        model(args.rounds)


if __name__ == "__main__":
    main()
