"""Times named callables (ours vs stock, same inputs) interleaved A,B,A,B after warm-up; reports
median and p20/p80, speed-up (stock/ours), GB/s from a caller-given bytes-moved model and peak
memory; writes a markdown table, an appended CSV and a JSON. A Case builds its inputs lazily
(``make()``), so only one case's tensors are alive at a time. Times are per call, in ms.
"""
import csv
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, Tuple

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = "unet_ext"
FIELDS = ["op", "shape", "dtype", "layout", "mode", "impl", "median_ms", "p20_ms", "p80_ms",
          "iters", "gb_s", "tflop_s", "peak_mib", "speedup", "check"]


@dataclass
class Case:
    """One benchmark: ``make()`` returns {impl name: zero-argument callable}, ours first.

    bytes_moved: the minimal traffic of the op (inputs read once, outputs written once, in the
    mode's direction(s)); every impl's GB/s is computed against it. no_memory: impls whose
    allocations the CPU tracker cannot see (compiled code allocates outside the dispatcher).
    """
    op: str
    shape: str
    dtype: str
    layout: str
    mode: str  # "forward" | "forward+backward"
    make: Callable[[], Dict[str, Callable[[], object]]]
    bytes_moved: int
    tol: Dict[str, float] = field(default_factory=lambda: dict(rtol=1e-4, atol=1e-5))
    no_memory: Tuple[str, ...] = ()
    flops: int = 0  # arithmetic of the mode (compute-bound ops report TFLOP/s from it)

    @property
    def name(self):
        return f"{self.op} {self.shape} {self.dtype} {self.layout} {self.mode}"


class _LiveBytes(TorchDispatchMode):
    """CPU peak memory: bytes of storages created by dispatched ops during one call, alive at
    once (outputs, saved-for-backward tensors, intermediates between ops). Views and in-place
    results of pre-existing tensors are not new; a finalizer on each storage marks its death.
    Scratch buffers that one kernel allocates and frees internally are not seen, for ours and
    stock alike (torch has no CPU allocator statistics; the profiler is too heavy for this)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.tracked = {}

    def _free(self, ptr, nbytes):
        self.tracked.pop(ptr, None)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        existing = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                    if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or ptr in self.tracked or ptr in existing:
                continue
            self.tracked[ptr] = nbytes
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, ptr, nbytes)
        return out


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def peak_bytes(fn, device):
    """Extra bytes at the peak of one call (its result still held), beyond what existed before."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with _LiveBytes() as tracker:
            result = fn()
        peak = tracker.peak
    del result
    return peak


def time_interleaved(fns, device, budget_s=1.0, min_iters=10, max_iters=500, warmup=2):
    """Per-call times (ms) of each callable, called A,B,A,B... until min_iters rounds are done
    and the budget is spent (or max_iters; at least 3 rounds, and no more than min_iters' worth
    past five budgets, for cases of seconds per call). CUDA: events around each call, after zeroing a
    256 MiB buffer so no call finds the previous one's data in L2; CPU: perf_counter."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    _sync(device)
    times = {name: [] for name in names}
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda") if device == "cuda" else None
    start, rounds = time.perf_counter(), 0
    def more():
        elapsed = time.perf_counter() - start
        if rounds < 3:
            return True
        if rounds < min_iters:  # heavy cases (whole layers on a CPU) stop at 3 rounds past 5 budgets
            return elapsed < 5 * budget_s
        return rounds < max_iters and elapsed < budget_s

    while more():
        events = []
        for name in names:
            if flush is not None:
                flush.zero_()
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                fns[name]()
                end.record()
                events.append((name, begin, end))
            else:
                t0 = time.perf_counter()
                fns[name]()
                times[name].append((time.perf_counter() - t0) * 1e3)
        if events:
            torch.cuda.synchronize()
            for name, begin, end in events:
                times[name].append(begin.elapsed_time(end))
        rounds += 1
    return times


def _check(outputs, tol):
    """Every impl's result against ours (llm.c's rule: validate before timing)."""
    ours = tree_leaves(outputs[OURS])
    verdict = {OURS: "ok"}
    for name, out in outputs.items():
        if name == OURS:
            continue
        try:
            theirs = tree_leaves(out)
            assert len(theirs) == len(ours), f"{len(theirs)} results, ours has {len(ours)}"
            for a, b in zip(ours, theirs):
                a, b = a.float(), b.float()
                rule = dict(tol)
                # atol_rel: an absolute tolerance relative to the largest |value| (fp32 sums over
                # 10^5 pixels: elements near 0 after cancellation differ by ~1e-6 of the scale).
                if "atol_rel" in rule:
                    rule["atol"] = rule.pop("atol_rel") * (a.abs().max().item() if a.numel() else 0.0)
                # flips: the fraction of elements allowed outside the tolerance (a ReLU output
                # within rounding of 0 lands on either side, and its pixel's gradient with it).
                # rel_norm: ||ours - theirs|| / ||theirs|| at most this (a whole model's output,
                # where rounding differences compound layer by layer; METHOD.md's measure).
                rel_norm = rule.pop("rel_norm", None)
                if rel_norm is not None:
                    diff = ((a - b).norm() / b.norm().clamp_min(1e-30)).item() if a.numel() else 0.0
                    assert diff <= rel_norm and a.isnan().equal(b.isnan()), (
                        f"||ours - theirs|| / ||theirs|| = {diff:.2e} (allowed: {rel_norm:.0e})")
                    continue
                flips = rule.pop("flips", 0.0)
                if flips and a.numel():
                    far = ~torch.isclose(a, b, rtol=rule["rtol"], atol=rule["atol"], equal_nan=True)
                    assert far.float().mean().item() <= flips, (
                        f"{int(far.sum())} of {a.numel()} elements differ beyond rtol={rule['rtol']}, "
                        f"atol={rule['atol']:.2e} (allowed: {flips:.1%})")
                    continue
                torch.testing.assert_close(a, b, **rule)
            verdict[name] = "ok"
        except (AssertionError, ValueError) as error:
            verdict[name] = "MISMATCH: " + str(error).strip().splitlines()[0]
    return verdict


def bench_case(case, device, budget_s=1.0, min_iters=10, max_iters=500, warmup=2):
    """Rows (dicts with FIELDS) of one case, one per impl; speed-up = impl median / ours."""
    fns = case.make()
    verdict = _check({name: fn() for name, fn in fns.items()}, case.tol)
    times = time_interleaved(fns, device, budget_s, min_iters, max_iters, warmup)
    rows = []
    for name, fn in fns.items():
        p20, median, p80 = np.percentile(times[name], [20, 50, 80])
        peak = None if (device == "cpu" and name in case.no_memory) else peak_bytes(fn, device)
        rows.append(dict(op=case.op, shape=case.shape, dtype=case.dtype, layout=case.layout,
                         mode=case.mode, impl=name, median_ms=round(float(median), 4),
                         p20_ms=round(float(p20), 4), p80_ms=round(float(p80), 4),
                         iters=len(times[name]), gb_s=round(case.bytes_moved / median / 1e6, 2),
                         tflop_s=round(case.flops / median / 1e9, 3) if case.flops else None,
                         peak_mib=None if peak is None else round(peak / 2**20, 2),
                         speedup=None, check=verdict[name]))
    ours_median = rows[0]["median_ms"]
    for row in rows:
        row["speedup"] = round(row["median_ms"] / ours_median, 3)
    del fns
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


# Substrings of Case.name to keep (run.py's --case; [] = all): one shape in the daily loop.
CASE_FILTER = []


def run_cases(cases, device, **timing):
    """All cases, with a tqdm bar on stderr; timing: budget_s, min_iters, max_iters, warmup."""
    from tqdm import tqdm

    cases = [c for c in cases if not CASE_FILTER or any(f in c.name for f in CASE_FILTER)]
    rows = []
    bar = tqdm(cases, desc="bench", unit="case", file=sys.stderr, dynamic_ncols=True)
    for case in bar:
        bar.set_postfix_str(case.name, refresh=True)
        rows += bench_case(case, device, **timing)
    return rows


def markdown(rows):
    """The table; the speed-up column is stock/ours on the stock rows (> 1: ours is faster)."""
    head = ["op", "shape", "dtype", "layout", "mode", "impl", "median ms [p20, p80]", "GB/s",
            "TFLOP/s", "peak MiB", "speed-up (stock/ours)", "check"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        speedup = "—" if r["impl"] == OURS else f"{r['speedup']:.2f}x"
        peak = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
        cells = [r["op"], r["shape"], r["dtype"], r["layout"], r["mode"], r["impl"],
                 f"{r['median_ms']:.3f} [{r['p20_ms']:.3f}, {r['p80_ms']:.3f}]",
                 f"{r['gb_s']:.1f}", "—" if r.get("tflop_s") is None else f"{r['tflop_s']:.3f}",
                 peak, speedup, r["check"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _git(*args):
    try:
        out = subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device):
    """Who measured what: device name, versions, unet_ext commit (+dirty if its code differs)."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        name = f"{name} ({torch.get_num_threads()} threads)"
    commit = _git("rev-parse", "--short", "HEAD")
    if commit and _git("status", "--porcelain", "--", "csrc", "unet_ext", "setup.py"):
        commit += "-dirty"
    return dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=device, device_name=name, torch=torch.__version__,
                cuda=torch.version.cuda, python=platform.python_version(),
                unet_ext_commit=commit, cpu_isa_cap=os.environ.get("UNET_EXT_CPU_ISA", ""))


def write_results(rows, meta, out_dir):
    """Appends rows (with meta) to out_dir/results.csv and writes out_dir/results-<date>.json."""
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, "results.csv")
    columns = list(meta) + FIELDS
    new = not os.path.exists(csv_path)
    with open(csv_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({**meta, **row})
    stamp = meta["date"].replace(":", "").replace("-", "").split("+")[0]
    json_path = os.path.join(out_dir, f"results-{stamp}-{meta['device']}.json")
    with open(json_path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return csv_path, json_path


def bar_chart(rows, path, title):
    """PNG of the speed-ups (stock median / ours) as small multiples: one row of panels per op,
    forward on the left, forward+backward (and the training step) on the right; one line per case
    (shape, dtype, layout), one marker per stock impl, the p20/p80 band as a whisker, a log axis
    shared by all panels, 1x (parity) marked. Green: ours faster, red: slower."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    stock = [r for r in rows if r["impl"] != OURS and r.get("speedup")]
    ours = {(r["op"], r["shape"], r["dtype"], r["layout"], r["mode"]): r for r in rows if r["impl"] == OURS}
    group = lambda r: "unet (whole model)" if r["op"].startswith("unet ") else r["op"]  # noqa: E731
    ops = list(dict.fromkeys(group(r) for r in stock))
    columns = ("forward", "forward+backward")
    column_of = lambda r: 0 if r["mode"] == "forward" else 1  # noqa: E731 (train, backward: right)
    panels = {(op, c): [] for op in ops for c in range(2)}
    for r in stock:
        panels[(group(r), column_of(r))].append(r)
    heights = [max(1, *(len({(r["shape"], r["dtype"], r["layout"]) for r in panels[(op, c)]}) for c in range(2)))
               for op in ops] or [1]
    lows = [r["speedup"] for r in stock] or [1.0]
    lo = 2.0 ** np.floor(np.log2(min(min(lows), 1.0) / 1.15))
    hi = 2.0 ** np.ceil(np.log2(max(max(lows), 1.0) * 1.15))
    impls = list(dict.fromkeys(r["impl"] for r in stock))
    markers = dict(zip(impls, "os^Dv<>"))
    fig, axes = plt.subplots(len(heights), 2, figsize=(13, 0.24 * sum(heights) + 0.75 * len(heights) + 1.0),
                             gridspec_kw=dict(height_ratios=heights), squeeze=False)
    for i, op in enumerate(ops or [""]):
        for c in range(2):
            ax = axes[i][c]
            cases = list(dict.fromkeys((r["shape"], r["dtype"], r["layout"]) for r in panels.get((op, c), [])))
            modes = list(dict.fromkeys(r["op"].replace("unet ", "") if op != r["op"] else r["mode"]
                                       for r in panels.get((op, c), []))) or [columns[c]]
            for r in panels.get((op, c), []):
                y = cases.index((r["shape"], r["dtype"], r["layout"]))
                base = ours.get((r["op"], r["shape"], r["dtype"], r["layout"], r["mode"]))
                if base and base["p80_ms"] and base["p20_ms"]:  # band: stock p20/ours p80 .. stock p80/ours p20
                    ax.plot([r["p20_ms"] / base["p80_ms"], r["p80_ms"] / base["p20_ms"]], [y, y],
                            color="0.6", linewidth=1.2, zorder=1)
                color = "tab:green" if r["speedup"] >= 1 else "tab:red"
                ax.scatter([r["speedup"]], [y], marker=markers[r["impl"]], color=color, s=22, zorder=2,
                           label=r["impl"])
                if r["impl"] == impls[0]:  # one label per case (several impls would overlap)
                    ax.annotate(f"{r['speedup']:.2f}x", (r["speedup"], y), xytext=(5, -3),
                                textcoords="offset points", fontsize=6.5)
            ax.axvline(1.0, color="black", linewidth=0.9)
            ax.set_xscale("log")
            ax.set_xlim(lo, hi)
            ticks = [2.0 ** k for k in range(int(np.log2(lo)), int(np.log2(hi)) + 1)]
            ax.xaxis.set_major_locator(FixedLocator(ticks))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticklabels([f"{t:g}x" for t in ticks], fontsize=7)
            ax.set_yticks(range(len(cases)), [" ".join(k) for k in cases], fontsize=6.5)
            ax.set_ylim(len(cases) - 0.5 if cases else 0.5, -0.5)
            ax.grid(axis="x", color="0.9", linewidth=0.6)
            ax.set_title(f"{op}: {', '.join(modes)}" if cases else f"{op}: {columns[c]} (no cases)", fontsize=8.5,
                         loc="left")
    handles = [plt.Line2D([], [], marker=markers[m], linestyle="", color="0.3", label=f"vs {m}") for m in impls]
    fig.legend(handles=handles, loc="upper right", fontsize=7, ncol=len(handles) or 1, frameon=False)
    fig.suptitle(f"{title}\nspeed-up of unet_ext = stock median / ours (log axis; > 1x: ours faster; "
                 "whisker: p20/p80 band)", fontsize=9, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
