"""Where the UNet's GPU time goes: ours against stock, kernel by kernel (the lease run's `profile`
step). For each case (the paper's network, batch 8, 572x572 valid, channels_last; bf16 and
float32; inference and training step) it times both models with CUDA events (median of a few
steps) and profiles a few more steps with torch.profiler, then prints per model:
  - the step's wall time, the summed kernel time and the gap between them (launch/host overhead),
  - the kernels by total time (name, calls per step, ms per step, share),
  - our dispatcher ops (unet_ext::*) by the kernel time under them,
and each layer's forward alone, ours against stock (F.conv2d + relu, the stock up-conv), at
batch 8, so the layers that lose show up by name. Also the output's relative difference
(||ours - stock|| / ||stock||), a correctness check at the model level.
The last lines printed are a short table; everything goes to --out (profile.md, profile.json).
Usage (on the GPU): python scripts/device_profile.py --out DIR [--quick]
"""
import argparse
import json
import os
import re
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import unet_ext  # noqa: E402
from unet_ext import ops, reference  # noqa: E402


def cuda_time_ms(fn, steps):
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def short(name, width=110):
    name = re.sub(r"\s+", " ", name)
    return name if len(name) <= width else name[: width - 3] + "..."


def kernel_table(prof, steps):
    """Device kernels by total time (ms per step), and the unet_ext ops' device time (the kernels
    under them). FunctionEventAvg of a kernel: device_type CUDA, its time in device_time_total."""
    kernels, ops_time = [], []
    for event in prof.key_averages():
        ms = event.device_time_total / 1e3 / steps
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels.append((ms, event.count / steps, event.key))
        elif event.key.startswith("unet_ext::"):
            ops_time.append((ms, event.count / steps, event.key))
    return sorted(kernels, reverse=True), sorted(ops_time, reverse=True)


def ceilings(lines, record):
    """The card's two ceilings as measured here (METHOD.md): a large device-to-device copy (bytes
    read + written) and a large bf16 matmul, on random data."""
    src = torch.randn(256 * 2**20, device="cuda")  # 1 GiB of float32
    dst = torch.empty_like(src)
    copy_ms = cuda_time_ms(lambda: dst.copy_(src), 10)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    mm_ms = cuda_time_ms(lambda: a @ b, 10)
    bandwidth = 2 * src.numel() * 4 / copy_ms / 1e9
    tflops = 2 * 8192**3 / mm_ms / 1e9
    lines.append(f"\nceilings: copy {bandwidth:.0f} GB/s (read + write), bf16 matmul 8192^3 {tflops:.0f} TFLOP/s\n")
    record.update(copy_gb_s=bandwidth, bf16_matmul_tflops=tflops)
    del src, dst, a, b
    torch.cuda.empty_cache()


def make_models(dtype, cast, size, batch, padding="valid"):
    torch.manual_seed(0)
    ours = unet_ext.UNet(base_channels=64, padding=padding).cuda()
    stock = reference.UNet(base_channels=64, padding=padding).cuda()
    stock.load_state_dict(ours.state_dict())
    if cast:
        ours, stock = ours.to(dtype), stock.to(dtype)
    ours, stock = ours.to(memory_format=torch.channels_last), stock.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 1, size, size, device="cuda", dtype=dtype if cast else torch.float32)
    x = x.contiguous(memory_format=torch.channels_last)
    out = ours.output_size(size)
    target = torch.randint(0, 2, (batch, out, out), device="cuda")
    weight = torch.rand(batch, out, out, device="cuda") + 0.5
    return {"unet_ext": ours, "stock": stock}, x, target, weight


def step_fn(model, name, x, target, weight, train):
    loss_fn = unet_ext.weighted_cross_entropy if name == "unet_ext" else reference.weighted_cross_entropy

    def run():
        if not train:
            with torch.no_grad():
                return model(x)
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(x).float(), target, weight)
        loss.backward()
        return loss
    return run


def profile_case(label, dtype, cast, train, batch, steps, lines, record):
    models, x, target, weight = make_models(dtype, cast, 572, batch)
    fns = {name: step_fn(m, name, x, target, weight, train) for name, m in models.items()}
    for fn in fns.values():  # warm-up: CUTLASS init, cuDNN heuristics, allocator
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    outputs = {}
    if not train:
        outputs = {name: fn().float() for name, fn in fns.items()}
        diff = ((outputs["unet_ext"] - outputs["stock"]).norm() / outputs["stock"].norm()).item()
    else:
        diff = float("nan")
    wall = {}
    for _ in range(2):  # interleaved
        for name, fn in fns.items():
            wall.setdefault(name, []).append(cuda_time_ms(fn, steps))
    case = {"case": label, "rel_diff_output": diff, "models": {}}
    lines.append(f"\n## {label}\n\noutput ||ours - stock|| / ||stock||: {diff:.3e}\n")
    for name, fn in fns.items():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                fn()
            torch.cuda.synchronize()
        kernels, op_rows = kernel_table(prof, steps)
        total = sum(ms for ms, _, _ in kernels)
        step_ms = min(wall[name])
        lines.append(f"### {name}: {step_ms:.2f} ms per step; kernels {total:.2f} ms; gap {step_ms - total:.2f} ms\n")
        lines.append("| ms/step | share | calls/step | kernel |\n|---|---|---|---|")
        for ms, calls, kname in kernels[:25]:
            lines.append(f"| {ms:.3f} | {ms / max(total, 1e-9):.1%} | {calls:g} | `{short(kname)}` |")
        if op_rows:
            lines.append("\n| op | device ms/step | calls/step |\n|---|---|---|")
            for ms, calls, oname in op_rows:
                lines.append(f"| {oname} | {ms:.3f} | {calls:g} |")
        lines.append("")
        case["models"][name] = {"step_ms": step_ms, "kernel_ms": total,
                                "kernels": [dict(ms=ms, calls=c, name=k) for ms, c, k in kernels[:40]],
                                "ops": [dict(ms=ms, calls=c, name=o) for ms, c, o in op_rows]}
    record.append(case)
    del models, fns, outputs
    torch.cuda.empty_cache()


# The paper's layers at 572: (C_in, H_in, C_out, kind): kind 'conv' (3x3 valid + ReLU), 'up' (2x2 s2).
LAYERS = [(1, 572, 64, "conv"), (64, 570, 64, "conv"), (64, 284, 128, "conv"), (128, 282, 128, "conv"),
          (128, 140, 256, "conv"), (256, 138, 256, "conv"), (256, 68, 512, "conv"), (512, 66, 512, "conv"),
          (512, 32, 1024, "conv"), (1024, 30, 1024, "conv"), (1024, 28, 512, "up"), (1024, 56, 512, "conv"),
          (512, 54, 512, "conv"), (512, 52, 256, "up"), (512, 104, 256, "conv"), (256, 102, 256, "conv"),
          (256, 100, 128, "up"), (256, 200, 128, "conv"), (128, 198, 128, "conv"), (128, 196, 64, "up"),
          (128, 392, 64, "conv"), (64, 390, 64, "conv")]


def layer_sweep(dtype, batch, steps, lines, record):
    lines.append(f"\n## Layers alone, forward, {str(dtype)[6:]}, batch {batch}, channels_last\n")
    lines.append("| layer | ours ms | stock ms | speed-up | ours TFLOP/s | kernels (ours) |\n|---|---|---|---|---|---|")
    for c_in, h, c_out, kind in LAYERS:
        x = torch.randn(batch, c_in, h, h, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
        if kind == "conv":
            w = (torch.randn(c_out, c_in, 3, 3, device="cuda") * (2 / (9 * c_in)) ** 0.5).to(dtype)
            b = torch.randn(c_out, device="cuda", dtype=dtype) * 0.1
            ours = lambda: ops.conv2d_relu(x, w, b, 0)  # noqa: E731
            stock = lambda: F.relu(F.conv2d(x, w, b))  # noqa: E731
            flops = 2 * batch * c_out * c_in * 9 * (h - 2) ** 2
        else:
            w = (torch.randn(c_in, c_out, 2, 2, device="cuda") * (2 / c_in) ** 0.5).to(dtype)
            b = torch.randn(c_out, device="cuda", dtype=dtype) * 0.1
            ours = lambda: ops.conv_transpose2x2(x, w, b)  # noqa: E731
            stock = lambda: F.conv_transpose2d(x, w, b, stride=2)  # noqa: E731
            flops = 2 * batch * c_out * c_in * 4 * h * h
        for fn in (ours, stock):
            fn()
        torch.cuda.synchronize()
        t_ours, t_stock = [], []
        for _ in range(2):
            t_ours.append(cuda_time_ms(ours, steps))
            t_stock.append(cuda_time_ms(stock, steps))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            ours()
            torch.cuda.synchronize()
        names = sorted({short(name, 60) for _, _, name in kernel_table(prof, 1)[0]})
        o, s = min(t_ours), min(t_stock)
        label = f"{kind} {c_in}x{h}->{c_out}"
        lines.append(f"| {label} | {o:.3f} | {s:.3f} | {s / o:.2f}x | {flops / o / 1e9:.0f} | {'; '.join(names)[:160]} |")
        record.append(dict(layer=label, dtype=str(dtype)[6:], batch=batch, ours_ms=o, stock_ms=s,
                           tflops=flops / o / 1e9, kernels=names))
        del x, w, b


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="bf16 only")
    parser.add_argument("--layers-only", action="store_true", help="only the layer sweep")
    parser.add_argument("--no-sm80", action="store_true",
                        help="skip the second layer sweep with the Hopper kernels off (UNET_EXT_SM90=0)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.backends.cudnn.benchmark = False
    lines = [f"# UNet profile on {torch.cuda.get_device_name()}, torch {torch.__version__}, "
             f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, build {unet_ext.build_info().get('cuda_archs')}, "
             f"UNET_EXT_SM90={os.environ.get('UNET_EXT_SM90', '(default)')}"]
    record = {"cases": [], "layers": []}
    cases = [("bf16 inference", torch.bfloat16, True, False), ("bf16 train step", torch.bfloat16, True, True)]
    if not args.quick:
        cases += [("float32 (TF32) inference", torch.float32, False, False)]
    t0 = time.time()
    if not args.layers_only:
        ceilings(lines, record)
    for label, dtype, cast, train in ([] if args.layers_only else cases):
        profile_case(f"{label}, batch {args.batch}, 572 valid", dtype, cast, train, args.batch, args.steps,
                     lines, record["cases"])
        print(f"profile: {label} done ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    layer_sweep(torch.bfloat16, args.batch, args.steps, lines, record["layers"])
    print(f"profile: layers done ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    if not args.layers_only and not args.no_sm80 and unet_ext.build_info().get("cutlass_sm90a"):
        # The same sweep on the sm_80 kernels (mma.sync), in a process of its own (the switch is
        # read once): which family wins where on this GPU.
        import subprocess
        sub = os.path.join(args.out, "sm80")
        subprocess.run([sys.executable, os.path.abspath(__file__), "--out", sub, "--layers-only",
                        "--batch", str(args.batch), "--steps", str(args.steps)],
                       env=dict(os.environ, UNET_EXT_SM90="0"), check=False, stdout=subprocess.DEVNULL)
        try:
            with open(os.path.join(sub, "profile.json")) as f:
                sm80 = {row["layer"]: row for row in json.load(f)["layers"]}
            lines.append("\n## The same layers on the sm_80 kernels (UNET_EXT_SM90=0)\n")
            lines.append("| layer | sm_90a ms | sm_80 ms | stock ms |\n|---|---|---|---|")
            for row in record["layers"]:
                other = sm80.get(row["layer"])
                if other:
                    lines.append(f"| {row['layer']} | {row['ours_ms']:.3f} | {other['ours_ms']:.3f} | {row['stock_ms']:.3f} |")
                    row["sm80_ms"] = other["ours_ms"]
        except (OSError, ValueError, KeyError) as error:
            lines.append(f"\n(the sm_80 sweep failed: {error})\n")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "profile.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "profile.json"), "w") as f:
        json.dump(record, f, indent=1)
    # The short table last (a lease's reply carries the end of the output).
    print("\n".join(line for line in lines if line.lstrip().startswith(("## ", "### ", "output", "ceilings"))))
    for row in record["layers"]:
        sm80 = f" (sm_80 {row['sm80_ms']:.3f})" if "sm80_ms" in row else ""
        print(f"{row['layer']:>22} ours {row['ours_ms']:.3f} ms{sm80} stock {row['stock_ms']:.3f} ms "
              f"{row['stock_ms'] / row['ours_ms']:.2f}x {row['tflops']:.0f} TFLOP/s")


if __name__ == "__main__":
    main()
