"""The CPU bf16 weight gradient of a channels_last convolution: ours (AVX512-BF16,
csrc/ops/cpu/conv_wgrad_bf16.cpp) against stock PyTorch's (aten::convolution_backward, oneDNN),
weight and bias gradients only, interleaved in the same run (medians), for every 3x3 layer of the
base-32 training step (batch 2, 316x316: the issue-11 bar's model). Reports milliseconds, the
ratio, the achieved GFLOP/s (2 x pixels x C_in x C_out x 9 / time), and each side's max error
against float64 as a multiple of the gradient's largest value. Writes a markdown table to --out.
``python -m benchmarks.bench_bf16_wgrad [--rounds N] [--out FILE]``.
"""
import argparse
import datetime
import statistics
import subprocess
import time

import torch

import unet_ext  # noqa: F401  (registers torch.ops.unet_ext)

# (C_in, C_out, input size) of the base-32 UNet's 3x3 convolutions at 2x316x316, encoder then decoder
STEP_LAYERS = [(32, 32, 314), (32, 64, 156), (64, 64, 154), (64, 128, 76), (128, 128, 74), (128, 256, 36),
               (256, 256, 34), (256, 512, 16), (512, 512, 14), (512, 256, 24), (256, 256, 22), (256, 128, 40),
               (128, 128, 38), (128, 64, 72), (64, 64, 70), (64, 32, 136), (32, 32, 134)]


def _tensors(ci, co, size, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    cl = torch.channels_last
    x = torch.randn(batch, ci, size, size, generator=g).to(torch.bfloat16).contiguous(memory_format=cl)
    w = (torch.randn(co, ci, 3, 3, generator=g) / (ci * 9) ** 0.5).to(torch.bfloat16).contiguous(memory_format=cl)
    grad = torch.randn(batch, co, size - 2, size - 2, generator=g).to(torch.bfloat16).contiguous(memory_format=cl)
    return x, w, grad


def ours(x, w, grad):
    _, gw, gb = torch.ops.unet_ext._conv2d_backward(grad, x, w, None, 0, [False, True, True])
    return gw, gb


def stock(x, w, grad):
    _, gw, gb = torch.ops.aten.convolution_backward(grad, x, w, [w.shape[0]], [1, 1], [0, 0], [1, 1], False,
                                                    [0, 0], 1, [False, True, True])
    return gw, gb


def _time(fn, *args):
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default=None, help="markdown file for the table")
    args = parser.parse_args(argv)
    from tqdm import tqdm
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [f"# CPU bf16 weight gradient, channels_last, batch 2 (base-32 step layers)",
             "",
             f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}, commit {commit}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds (medians); "
             f"error: max |grad - float64| / max |float64|.",
             "",
             "| layer | ours ms | stock ms | stock / ours | ours GFLOP/s | stock GFLOP/s | ours err | stock err |",
             "|---|---|---|---|---|---|---|---|"]
    total = {"ours": 0.0, "stock": 0.0}
    for ci, co, size in tqdm(STEP_LAYERS, desc="layers"):
        x, w, grad = _tensors(ci, co, size)
        for fn in (ours, stock):
            fn(x, w, grad)  # warm-up
        times = {"ours": [], "stock": []}
        for _ in range(args.rounds):
            times["ours"].append(_time(ours, x, w, grad))
            times["stock"].append(_time(stock, x, w, grad))
        exact = torch.ops.aten.convolution_backward(grad.double(), x.double(), w.double(), [co], [1, 1], [0, 0],
                                                    [1, 1], False, [0, 0], 1, [False, True, False])[1]
        errors = {name: ((fn(x, w, grad)[0].double() - exact).abs().max() / exact.abs().max()).item()
                  for name, fn in (("ours", ours), ("stock", stock))}
        med = {k: statistics.median(v) for k, v in times.items()}
        for k in total:
            total[k] += med[k]
        flops = 2.0 * 2 * (size - 2) ** 2 * ci * co * 9
        lines.append(f"| {ci} -> {co} @ {size} | {med['ours'] * 1e3:.2f} | {med['stock'] * 1e3:.2f} | "
                     f"{med['stock'] / med['ours']:.2f}x | {flops / med['ours'] / 1e9:.0f} | "
                     f"{flops / med['stock'] / 1e9:.0f} | {errors['ours']:.1e} | {errors['stock']:.1e} |")
    lines.append(f"| all | {total['ours'] * 1e3:.1f} | {total['stock'] * 1e3:.1f} | "
                 f"{total['stock'] / total['ours']:.2f}x | | | | |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        import os
        import tempfile
        directory = os.path.dirname(os.path.abspath(args.out))
        if os.path.exists(args.out):
            raise SystemExit(f"--out: {args.out} exists; not overwriting it")
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
