"""Runs every op benchmark on the best device present (CUDA when the GPU and our CUDA kernels are
both there, else CPU): markdown table on stdout; CSV (appended), JSON and a PNG of the speed-ups in
--out (default benchmarks/results). Exit status: 0, 1 if an impl disagreed with ours, 2 on bad
usage. ``python -m benchmarks.run [--device cpu|cuda] [--quick] [--out DIR] [--op NAME]``;
``--compare OLD.json NEW.json`` compares two runs instead (benchmarks/compare.py).
"""
import argparse
import os
import sys

import torch

import unet_ext

try:
    from . import bench_conv, bench_convert, bench_crop_concat, bench_max_pool, bench_unet, bench_weighted_cross_entropy, harness
    from . import compare
except ImportError:  # run as a script
    import bench_conv
    import bench_convert
    import bench_crop_concat
    import bench_max_pool
    import bench_unet
    import bench_weighted_cross_entropy
    import compare
    import harness

BENCHES = {"crop_concat": bench_crop_concat, "weighted_cross_entropy": bench_weighted_cross_entropy,
           "max_pool2x2": bench_max_pool, "conv": bench_conv, "unet": bench_unet,
           "convert": bench_convert}
# quick: a CI-sized run (about a minute on a 2-core CPU); full: ~1 s and >= 10 rounds per case.
TIMING = {True: dict(budget_s=0.25, min_iters=5, warmup=1),
          False: dict(budget_s=1.0, min_iters=10, warmup=2)}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints the whole usage)
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def best_device():
    cuda = torch.cuda.is_available() and unet_ext.build_info()["cuda_kernels"]
    return "cuda" if cuda else "cpu"


def acceptance_line(rows, device):
    row = next((r for r in rows if all(r[k] == v for k, v in bench_weighted_cross_entropy.ACCEPTANCE.items())), None)
    if row is None:
        return None
    verdict = ("PASS" if row["speedup"] >= 2 else "FAIL") if device == "cpu" else "info"
    return (f"acceptance ({device}): weighted_cross_entropy {row['shape']} {row['dtype']} {row['mode']}: "
            f"{row['speedup']:.2f}x vs unfused stock (CPU needs >= 2x): {verdict}")


def main(argv=None, prog=None):
    parser = _Parser(prog=prog or "python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="default: cuda if available with unet_ext's CUDA kernels, else cpu")
    parser.add_argument("--quick", action="store_true", help="short timing budget, no torch.compile")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                        help="results folder (default: benchmarks/results)")
    parser.add_argument("--op", choices=sorted(BENCHES), action="append",
                        help="only this op (repeatable; default: all)")
    parser.add_argument("--case", action="append", default=[],
                        help="only cases whose name (op shape dtype layout mode) contains this (repeatable)")
    parser.add_argument("--compare", nargs=2, metavar=("OLD.json", "NEW.json"),
                        help="compare two runs' results (per-case ratios, noise band, regressions); runs nothing")
    parser.add_argument("--metric", choices=["time", "speedup"], default="time",
                        help="with --compare: our median (time), or our time relative to stock's in each run")
    parser.add_argument("--tol", type=float, default=0.05, help="with --compare: slow-down tolerated beyond noise")
    parser.add_argument("--strict", action="store_true", help="with --compare: exit 1 on a regression")
    args = parser.parse_args(argv)
    if args.compare:
        for path in args.compare:
            if not os.path.isfile(path):
                parser.error(f"--compare: no file {path}")
        text, regressions = compare.report(*args.compare, metric=args.metric, tol=args.tol)
        print(text)
        return 1 if (regressions and args.strict) else 0
    device = args.device or best_device()
    if device == "cuda" and best_device() != "cuda":
        parser.error("--device cuda: no CUDA device, or unet_ext was built without CUDA kernels")

    harness.CASE_FILTER[:] = args.case
    rows = []
    for name in args.op or list(BENCHES):
        rows += BENCHES[name].run(device, quick=args.quick, **TIMING[args.quick])
    meta = harness.environment(device)
    print(f"unet_ext benchmarks on {meta['device_name']}, torch {meta['torch']}, "
          f"commit {meta['unet_ext_commit']}, {meta['date']}{' (quick)' if args.quick else ''}\n")
    print(harness.markdown(rows))
    lines = [acceptance_line(rows, device)] + (bench_conv.acceptance_lines(rows) if device == "cpu" else [])
    lines = [line for line in lines if line]
    if lines:
        print("\n" + "\n".join(lines))
    csv_path, json_path = harness.write_results(rows, meta, args.out)
    png_path = os.path.join(args.out, os.path.basename(json_path).replace("results-", "speedup-", 1)[:-5] + ".png")
    harness.bar_chart(rows, png_path, f"unet_ext vs stock on {meta['device_name']} ({meta['date']})")
    print(f"results: {csv_path}, {json_path}, {png_path}", file=sys.stderr)
    mismatches = [r for r in rows if r["check"] != "ok"]
    for r in mismatches:
        print(f"MISMATCH {r['op']} {r['shape']} {r['dtype']} {r['mode']} {r['impl']}: {r['check']}", file=sys.stderr)
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
