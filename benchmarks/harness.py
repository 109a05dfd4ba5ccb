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


def run_cases(cases, device, **timing):
    """All cases, with a tqdm bar on stderr; timing: budget_s, min_iters, max_iters, warmup."""
    from tqdm import tqdm

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
    """PNG of the speed-ups (stock/ours) of every stock row; a line marks parity."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stock = [r for r in rows if r["impl"] != OURS]
    labels = [f"{r['op']} {r['shape']} {r['dtype']} {r['layout']} {r['mode']} vs {r['impl']}"
              for r in stock]
    fig, ax = plt.subplots(figsize=(13, 0.3 * len(stock) + 1.2))
    ax.barh(range(len(stock)), [r["speedup"] for r in stock],
            color=["tab:green" if r["speedup"] >= 1 else "tab:red" for r in stock])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(stock)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up of unet_ext (stock median / ours)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
