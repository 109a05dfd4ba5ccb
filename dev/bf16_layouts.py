"""Per-layer bf16 oneDNN convolutions (issue 11) in the layouts a U-Net step could give them,
interleaved, medians (ms): our channels_last (nhwc; the layout unet_ext.UNet runs bf16 in), stock's
NCHW (oneDNN reorders it to its blocked nChw16c inside each call), and channels_last converted
to NCHW per call (what handing only some layers the blocked kernels would cost); the weight
gradient also as at::mm GEMMs (one per image and kernel row: grad^T [C_out, H_out*W_in] times the
input's rows, the kx taps as overlapping columns), the ceiling of a GEMM route through the BLAS.
The layers are base 32 at 2 x 316 x 316 (shallow: 32/64 channels at 68-316 px; --deep adds the
rest). Run under the machine's lock:

  flock /tmp/unet_ext_cpu.lock python -m dev.bf16_layouts [--deep] [--rounds 7]
"""
import argparse
import os
import statistics
import time

import torch

BF16 = torch.bfloat16
CL = torch.channels_last
# (C_in, C_out, H_in) of the 3x3 convolutions, batch 2
SHALLOW = [(32, 32, 314), (32, 64, 156), (64, 64, 154), (128, 64, 72), (64, 64, 70), (64, 32, 136), (32, 32, 134)]
DEEP = [(64, 128, 76), (128, 128, 74), (128, 256, 36), (256, 256, 34), (256, 512, 16), (512, 512, 14),
        (512, 256, 24), (256, 256, 22), (256, 128, 40), (128, 128, 38)]


def backward(g, x, w, mask):
    return torch.ops.aten.convolution_backward(g, x, w, [w.shape[0]], [1, 1], [0, 0], [1, 1], False, [0, 0], 1, mask)


def wgrad_mm(g, x):
    """grad_weight [C_out, C_in, 3, 3] (float32) as 3 GEMMs an image on the nhwc tensors."""
    n, co, ho, wo = g.shape
    ci, w_in = x.shape[1], x.shape[3]
    wide = torch.zeros(n, ho, w_in, co, dtype=g.dtype)  # grad padded to the input's width
    wide[:, :, :wo] = g.permute(0, 2, 3, 1)
    k = ho * w_in - 2  # the last two columns of the last row are zero padding
    out = torch.zeros(3, co, 3 * ci)
    for i in range(n):
        a = wide[i].reshape(-1, co)[:k].t()
        flat = x[i].permute(1, 2, 0).reshape(-1)
        for ky in range(3):
            out[ky] += (a @ flat[ky * w_in * ci:].as_strided((k, 3 * ci), (ci, 1))).float()
    return out.view(3, co, 3, ci).permute(1, 3, 0, 2)


def layer(ci, co, h, rounds):
    x = torch.randn(2, ci, h, h).to(BF16)
    w = (torch.randn(co, ci, 3, 3) * 0.05).to(BF16)
    g = torch.randn(2, co, h - 2, h - 2).to(BF16)
    xl, wl, gl = (t.contiguous(memory_format=CL) for t in (x, w, g))
    per_call = lambda t: t.contiguous()  # noqa: E731
    cases = {
        "fwd": {
            "nhwc": lambda: torch.conv2d(xl, wl),
            "nchw": lambda: torch.conv2d(x, w),
            "nhwc>nchw": lambda: torch.conv2d(per_call(xl), per_call(wl)).contiguous(memory_format=CL),
        },
        "wgrad": {
            "nhwc": lambda: backward(gl, xl, wl, [False, True, True]),
            "nchw": lambda: backward(g, x, w, [False, True, True]),
            "nhwc>nchw": lambda: backward(per_call(gl), per_call(xl), per_call(wl), [False, True, True]),
            "mm": lambda: wgrad_mm(gl, xl),
        },
        "dgrad": {
            "nhwc": lambda: backward(gl, xl, wl, [True, False, False]),
            "nchw": lambda: backward(g, x, w, [True, False, False]),
            "nhwc>nchw": lambda: backward(per_call(gl), per_call(xl), per_call(wl),
                                          [True, False, False])[0].contiguous(memory_format=CL),
        },
    }
    ref = backward(gl, xl, wl, [False, True, False])[1].float()
    err = ((wgrad_mm(gl, xl) - ref).abs().max() / ref.abs().max()).item()
    assert err < 2e-2, f"GEMM weight gradient off by {err:.3g} (relative)"
    for kind, fns in cases.items():
        times = {name: [] for name in fns}
        for r in range(rounds + 1):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                if r:
                    times[name].append((time.perf_counter() - t0) * 1e3)
        cells = "  ".join(f"{name} {statistics.median(v):6.2f}" for name, v in times.items())
        print(f"{ci:4d} -> {co:4d} at {h:3d}  {kind:5s}  {cells}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--deep", action="store_true", help="the deep layers too")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    print(f"threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.2f}; medians, ms", flush=True)
    for shape in SHALLOW + (DEEP if args.deep else []):
        layer(*shape, args.rounds)
    print(f"load {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
