"""Compares two benchmark runs (results-*.json from benchmarks/run.py): per case, our median
new/old with its noise band, and the speed-up against stock in each run; flags regressions.

A case is (op, shape, dtype, layout, mode). Metric "time" (default): our median time, new/old.
Metric "speedup": our time relative to stock's in the same run (ours/stock, measured interleaved,
so a machine that is busier in one run than the other cancels out): new/old of that.
Noise band of a ratio new/old: [new_p20 / old_p80, new_p80 / old_p20], the ratios the two runs'
p20-p80 spreads allow. A case is a REGRESSION when the whole band is above 1 + tol (slower
beyond noise and by more than tol), FASTER when the whole band is below 1 / (1 + tol).
``python -m benchmarks.run --compare OLD.json NEW.json [--metric speedup] [--tol 0.05] [--strict]``
"""
import json

OURS = "unet_ext"
KEY = ("op", "shape", "dtype", "layout", "mode")


def load(path):
    with open(path) as f:
        data = json.load(f)
    return data.get("meta", {}), data["rows"]


def _by_case(rows):
    cases = {}
    for r in rows:
        cases.setdefault(tuple(r[k] for k in KEY), {})[r["impl"]] = r
    return cases


def _value(impls, metric):
    """(median, low, high) of the compared quantity (larger = slower), or None."""
    ours = impls.get(OURS)
    if ours is None:
        return None
    if metric == "time":
        return ours["median_ms"], ours["p20_ms"], ours["p80_ms"]
    stock = impls.get("stock")
    if stock is None or not stock["median_ms"]:
        return None
    return (ours["median_ms"] / stock["median_ms"], ours["p20_ms"] / stock["p80_ms"],
            ours["p80_ms"] / stock["p20_ms"])


def compare(old_rows, new_rows, metric="time", tol=0.05):
    """Rows of the comparison (dicts), regressions first, then the largest slow-downs."""
    old, new = _by_case(old_rows), _by_case(new_rows)
    out = []
    for key in old.keys() & new.keys():
        a, b = _value(old[key], metric), _value(new[key], metric)
        if a is None or b is None or not a[0] or not a[1]:
            continue
        ratio, low, high = b[0] / a[0], b[1] / a[2], b[2] / a[1]
        verdict = "REGRESSION" if low > 1 + tol else ("faster" if high < 1 / (1 + tol) else "~")
        speedups = [old[key].get("stock", {}).get("speedup"), new[key].get("stock", {}).get("speedup")]
        out.append(dict(zip(KEY, key), old_ms=old[key][OURS]["median_ms"], new_ms=new[key][OURS]["median_ms"],
                        ratio=ratio, low=low, high=high, verdict=verdict,
                        speedup_old=speedups[0], speedup_new=speedups[1]))
    order = {"REGRESSION": 0, "faster": 2, "~": 1}
    out.sort(key=lambda r: (order[r["verdict"]], -r["ratio"]))
    return out, sorted(old.keys() - new.keys()), sorted(new.keys() - old.keys())


def _speedup(value):
    return "—" if value is None else f"{value:.2f}x"


def report(old_path, new_path, metric="time", tol=0.05):
    """The printed comparison, and the number of regressions."""
    (old_meta, old_rows), (new_meta, new_rows) = load(old_path), load(new_path)
    rows, only_old, only_new = compare(old_rows, new_rows, metric, tol)
    lines = []
    for tag, path, meta in (("old", old_path, old_meta), ("new", new_path, new_meta)):
        lines.append(f"{tag}: {path}: commit {meta.get('unet_ext_commit')}, {meta.get('date')}, "
                     f"{meta.get('device_name')}, torch {meta.get('torch')}")
    if old_meta.get("device_name") != new_meta.get("device_name"):
        lines.append("WARNING: the two runs are on different devices")
    what = "our median, new/old" if metric == "time" else "our time relative to stock's (same run), new/old"
    lines.append(f"\nratio = {what}; band from each run's p20/p80; REGRESSION: band above {1 + tol:.2f}\n")
    head = ["op", "shape", "dtype", "layout", "mode", "ours old ms", "ours new ms", "ratio [band]",
            "speed-up vs stock old -> new", "verdict"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["op"], r["shape"], r["dtype"], r["layout"], r["mode"], f"{r['old_ms']:.3f}",
                 f"{r['new_ms']:.3f}", f"{r['ratio']:.3f} [{r['low']:.2f}, {r['high']:.2f}]",
                 f"{_speedup(r['speedup_old'])} -> {_speedup(r['speedup_new'])}",
                 "**REGRESSION**" if r["verdict"] == "REGRESSION" else r["verdict"]]
        lines.append("| " + " | ".join(cells) + " |")
    regressions = sum(r["verdict"] == "REGRESSION" for r in rows)
    faster = sum(r["verdict"] == "faster" for r in rows)
    lines.append(f"\n{len(rows)} cases compared: {regressions} regression(s), {faster} faster, "
                 f"{len(rows) - regressions - faster} within noise"
                 + (f"; {len(only_old)} only in old" if only_old else "")
                 + (f"; {len(only_new)} only in new" if only_new else ""))
    return "\n".join(lines), regressions


def main(argv=None):
    """``python -m benchmarks.compare OLD.json NEW.json``: the same as run.py's --compare, without
    importing unet_ext (no built library needed, e.g. for a GPU lease's results)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.split("\n")[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--metric", choices=["time", "speedup"], default="time")
    parser.add_argument("--tol", type=float, default=0.05)
    parser.add_argument("--strict", action="store_true", help="exit 1 on a regression")
    args = parser.parse_args(argv)
    text, regressions = report(args.old, args.new, args.metric, args.tol)
    print(text)
    sys.stdout.flush()
    return 1 if (regressions and args.strict) else 0


if __name__ == "__main__":
    raise SystemExit(main())
