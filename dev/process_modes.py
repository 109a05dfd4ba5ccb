"""Per-process figures of the CPU training step (issue 11 in bf16, issue 14 in float32): the step
of base 32 at 316x316 batch 2 (benchmarks/bench_unet.py's "train step" case), ours and stock
interleaved, both under bf16 autocast (--precision bf16, the default) or both in float32
(--precision float32), in N fresh processes, one line each: median [p20, p80] ms, minor page
faults a step (getrusage), AnonHugePages of the process, and stock / ours. A harness run is one
process, so its figure is one draw of whatever is fixed per process (where the huge pages and
the heap's pages landed, the host's state); this shows the spread of those draws. --env
NAME=VALUE (repeatable) alternates processes with and without the setting, e.g.
UNET_EXT_HUGE_PAGES=0. Run under the machine's lock:

  flock /tmp/unet_ext_cpu.lock python -m dev.process_modes --procs 4 --env UNET_EXT_HUGE_PAGES=0
"""
import argparse
import os
import resource
import statistics
import subprocess
import sys
import time


def child(rounds, warmup, precision):
    import torch

    import unet_ext
    from unet_ext import reference

    torch.manual_seed(0)
    ours = unet_ext.UNet(base_channels=32)
    stock = reference.UNet(base_channels=32)
    stock.load_state_dict(ours.state_dict())
    x = torch.randn(2, 1, 316, 316)
    out = ours.output_size(316)
    target = torch.randint(0, 2, (2, out, out))
    weight = torch.rand(2, out, out) + 0.5
    sides = {"ours": (ours, unet_ext.weighted_cross_entropy), "stock": (stock, reference.weighted_cross_entropy_unfused)}
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=1e-6, momentum=0.99) for name, (m, _) in sides.items()}

    def step(name):
        model, loss_fn = sides[name]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_fn(model(x), target, weight)
        optimizers[name].zero_grad(set_to_none=True)
        loss.backward()
        optimizers[name].step()

    times = {name: [] for name in sides}
    faults = {name: [] for name in sides}
    for r in range(warmup + rounds):
        for name in sides:
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            step(name)
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt * 1e3)
                faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    huge = 0
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("AnonHugePages"):
                huge = int(line.split()[1]) // 1024

    def q(v, p):
        return sorted(v)[int(p * (len(v) - 1))]

    parts = [f"{name} {statistics.median(v):.1f} [{q(v, .2):.1f}, {q(v, .8):.1f}] ms "
             f"{int(statistics.median(faults[name]))} faults" for name, v in times.items()]
    ratio = statistics.median(times["stock"]) / statistics.median(times["ours"])
    print(f"{' | '.join(parts)} | {ratio:.3f}x | AnonHuge {huge} MiB | unet_ext {os.path.dirname(unet_ext.__file__)}",
          flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precision", choices=("bf16", "float32"), default="bf16")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE: alternate processes with it")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.rounds, args.warmup, args.precision)
    configs = [{}] + ([dict(kv.split("=", 1) for kv in args.env)] if args.env else [])
    print(f"{args.precision}, load {os.getloadavg()[0]:.2f}", flush=True)
    ratios = []
    for i in range(args.procs):
        for extra in configs:
            label = " ".join(f"{k}={v}" for k, v in extra.items()) or "default"
            print(f"{label:24s} ", end="", flush=True)
            command = [sys.executable, "-m", "dev.process_modes", "--child", "--rounds", str(args.rounds),
                       "--warmup", str(args.warmup), "--precision", args.precision]
            result = subprocess.run(command, env={**os.environ, **extra}, check=True, stdout=subprocess.PIPE, text=True)
            print(result.stdout, end="", flush=True)
            ratios.append(float(result.stdout.split(" | ")[2].rstrip("x")))
    print(f"stock / ours over {len(ratios)} processes: median {statistics.median(ratios):.3f}x, "
          f"range {min(ratios):.3f}-{max(ratios):.3f}x", flush=True)
    print(f"load {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
