"""One workshop run (dev/loss.py, dev/conv.py): build the variant file, validate every variant at
the library's setting, time them with the library's op and stock PyTorch in the same rounds,
sweep the launch/tile setting of each variant, and print the tables and what to promote."""
import argparse
import os
import sys

import torch

try:
    from . import harness
except ImportError:
    import harness


def cpu_isa():
    try:
        from unet_ext.__main__ import cpu_isa as isa
    except ImportError:  # no loadable library: the same rule, from /proc/cpuinfo
        with open("/proc/cpuinfo") as f:
            return "avx512" if " avx512bw" in f.read() else "avx2"
    return isa()[0]


def show(setting):
    return "x".join(map(str, setting)) if isinstance(setting, tuple) else str(setting)


def cpu_defines():
    """The ISA of the variant files: the library's choice for this processor (AVX-512 or AVX2)."""
    return ["-DDEV_ISA_AVX2"] if cpu_isa() == "avx2" else []


def main(workshop_class, argv, prog, doc):
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--shape", help="comma-separated, e.g. " + ",".join(map(str, workshop_class.default_shape)))
    parser.add_argument("--variant", type=int, action="append", help="only these variants (repeatable)")
    parser.add_argument("--sweep", help="comma-separated settings to sweep (default: the workshop's list)")
    parser.add_argument("--no-sweep", action="store_true", help="only the table of variants")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="CPU threads of the variants, the library and stock (on a loaded machine 1 "
                             "times the kernels, not the scheduler: a parallel region waits for its slowest thread)")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of timing per table")
    parser.add_argument("--build-dir", default=harness.CACHE,
                        help="where built variant libraries are kept (a GPU lease: the kit's, prebuilt)")
    parser.add_argument("--build-only", action="store_true",
                        help="build the variant library (for the lease kit: DEV_CUDA_ARCH=sm_90a) and stop")
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(",")) if args.shape else workshop_class.default_shape
    if args.device == "cuda" and not args.build_only and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU here (the CUDA variants run on the GPU lease: dev/README.md)")
    if args.build_only:
        source = os.path.join(os.path.dirname(os.path.abspath(__file__)), workshop_class.sources[args.device])
        path = harness.build(source, cpu_defines() if args.device == "cpu" else [], out_dir=args.build_dir)
        print(path)
        return 0
    torch.set_num_threads(args.threads)  # the library's op and stock get the variants' threads
    w = workshop_class(args.device, shape, args.threads)
    w.bind(harness.load(harness.build(w.source, w.defines, out_dir=args.build_dir)))
    variants = args.variant or sorted(w.variants)
    setting_name = w.setting_name[args.device]
    print(f"{w.name}, shape {shape}, {args.device}"
          + (f", {args.threads} threads, {harness.load_note()}" if args.device == "cpu" else
             f", {torch.cuda.get_device_name()}"))
    print(f"{'library' if w.library_variant.get(args.device) else 'default'} setting: "
          f"{setting_name}={show(w.library_setting)}\n")

    # 1. every variant validated at the library's setting, then timed with the library and stock.
    fns, rows = {}, []
    for v in variants:
        w.check(v, w.library_setting)
        fns[f"v{v}"] = (lambda v=v: w.run(v, w.library_setting))
    if w.library() is not None:
        fns["library op"] = w.library()
    fns["stock"] = w.stock()
    times = harness.time_interleaved(fns, args.device, budget_s=args.budget)
    for name, ms in times.items():
        label = w.variants[int(name[1:])] if name.startswith("v") else (
            "torch.ops.unet_ext (all of it: checks, outputs)" if name == "library op" else "unet_ext.reference")
        rows.append(dict(name=name, setting=f"{setting_name}={show(w.library_setting)}" if name.startswith("v") else label,
                         ms=ms, bytes=w.bytes))
        if name.startswith("v"):
            rows[-1]["setting"] += f": {label}"
    print(harness.table(rows, baseline="stock"))

    if args.no_sweep:
        return 0
    # 2. the sweep: each variant at each setting, validated first, timed interleaved.
    parse = getattr(w, "parse", int)
    settings = [parse(str(s)) for s in (args.sweep.split(",") if args.sweep else w.sweep[args.device])]
    fns, labels = {}, {}
    for v in [v for v in variants if v in w.swept[args.device]]:
        for s in settings:
            try:
                w.check(v, s)
            except (AssertionError, RuntimeError) as error:
                print(f"skip v{v} {setting_name}={s}: {str(error).splitlines()[0]}")
                continue
            key = f"v{v} {setting_name}={show(s)}"
            fns[key] = (lambda v=v, s=s: w.run(v, s))
            labels[key] = (v, s)
    times = harness.time_interleaved(fns, args.device, budget_s=args.budget)
    library = (w.library_variant.get(args.device), w.library_setting)
    rows = [dict(name=k, setting="the library's kernel and setting" if labels[k] == library else "",
                 ms=ms, bytes=w.bytes) for k, ms in times.items()]
    # On a GPU the median; on a shared CPU the minimum (the least disturbed run).
    best = min(rows, key=lambda r: r["ms"][0 if args.device == "cuda" else 3])
    print(f"\nsweep of {setting_name}:")
    print(harness.table(rows, baseline=rows[0]["name"]))
    print(f"\nbest: {best['name']} (median {best['ms'][0]:.3f} ms, min {best['ms'][3]:.3f} ms). Promote: {w.promotion[args.device]} "
          "(dev/README.md).")
    return 0
