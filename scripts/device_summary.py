"""Writes a GPU lease run's summary.md and results.json (run.sh's last step; plain Python, no
torch needed): the steps with their status and seconds, the test counts and failures (from the
pytest JUnit XML), and every benchmark row with the UNet rows also as tiles/s, stamped with the
device, driver, date, commit and torch. Usage: device_summary.py --work DIR --out DIR ...
"""
import argparse
import datetime
import glob
import json
import os
import re
import subprocess
import xml.etree.ElementTree as ET


def read_steps(path):
    steps = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                name, status, seconds, command = (line.rstrip("\n").split("\t") + ["", "", ""])[:4]
                steps.append(dict(name=name, status=status, seconds=int(seconds or 0), command=command))
    return steps


def read_tests(path):
    """Counts and the failed tests' ids from a JUnit XML file, or None."""
    if not os.path.exists(path):
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return None
    counts = dict(tests=0, failures=0, errors=0, skipped=0)
    failed = []
    for case in root.iter("testcase"):
        counts["tests"] += 1
        for kind, key in (("failure", "failures"), ("error", "errors"), ("skipped", "skipped")):
            element = case.find(kind)
            if element is not None:
                counts[key] += 1
                if kind != "skipped":
                    message = (element.get("message") or "").splitlines()[:1]
                    failed.append(f"{case.get('classname')}::{case.get('name')}: {' '.join(message)[:200]}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed"] = failed
    return counts


def read_bench(work):
    """Every benchmark run's rows (the UNet run, the ops run), with the first run's meta."""
    paths = sorted(glob.glob(os.path.join(work, "bench*", "results-*.json")))
    if not paths:
        return None
    bench = {"meta": None, "rows": []}
    for path in paths:
        with open(path) as f:
            run = json.load(f)
        bench["meta"] = bench["meta"] or run["meta"]
        bench["rows"] += run["rows"]
    for row in bench["rows"]:
        batch = re.search(r"\bb(\d+)\b", row["shape"])
        if row["op"].startswith("unet") and batch and row.get("median_ms"):
            row["tiles_per_s"] = round(int(batch.group(1)) / (row["median_ms"] / 1e3), 2)
    return bench


def driver_and_gpu(setup_log):
    text = open(setup_log).read() if os.path.exists(setup_log) else ""
    driver = re.search(r"Driver Version:\s*([\d.]+)", text)
    gpu = re.search(r"GPU (NVIDIA[^\n]*)", text)
    return (driver.group(1) if driver else None), (gpu.group(1).strip() if gpu else None)


def git(*args):
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def markdown(results):
    lines = [f"# unet_ext GPU lease run{' (dry run, no GPU)' if results['dry_run'] else ''}", "",
             f"- device: {results['gpu'] or 'none'}, driver {results['driver'] or '-'}",
             f"- date: {results['date']}, commit {results['commit']}, torch {results['torch'] or '-'}",
             f"- kit: {results['kit'] or '-'}",
             f"- wall time: {results['seconds']} s", "",
             "| step | result | seconds |", "|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']} |" for s in results["steps"]]
    tests = results["tests"]
    if tests:
        lines += ["", f"Tests: {tests['passed']} passed, {tests['failures']} failed, {tests['errors']} errors, "
                      f"{tests['skipped']} skipped (of {tests['tests']})."]
        lines += [f"- FAILED {name}" for name in tests["failed"][:60]]
    bench = results["bench"]
    if bench:
        lines += ["", "## Benchmarks (stock median / ours; quick timing)", "",
                  "| op | shape | dtype | layout | mode | vs | ours ms | stock ms | speed-up | tiles/s (ours) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        ours = {(r["op"], r["shape"], r["dtype"], r["layout"], r["mode"]): r
                for r in bench["rows"] if r["impl"] == "unet_ext"}
        for r in bench["rows"]:
            if r["impl"] == "unet_ext":
                continue
            o = ours.get((r["op"], r["shape"], r["dtype"], r["layout"], r["mode"]), {})
            lines.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['layout']} | {r['mode']} | {r['impl']} | "
                         f"{o.get('median_ms', '-')} | {r['median_ms']} | {r['speedup']:.2f}x | "
                         f"{o.get('tiles_per_s', '')} |")
        bad = [r for r in bench["rows"] if r.get("check") != "ok"]
        lines += [f"- MISMATCH {r['op']} {r['shape']} {r['dtype']} {r['impl']}: {r['check']}" for r in bad]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--dry-run", type=int, default=0)
    parser.add_argument("--seconds", type=int, default=0)
    parser.add_argument("--kit", default=None, help="the kit's folder (its kit.env says what was built)")
    args = parser.parse_args()
    driver, gpu = driver_and_gpu(os.path.join(args.work, "setup.log"))
    bench = read_bench(args.work)
    kit_env = os.path.join(args.kit, "kit.env") if args.kit else ""
    torch_version = None
    setup_log = os.path.join(args.work, "setup.log")
    if os.path.exists(setup_log):
        found = re.search(r"torch (\S+) CUDA", open(setup_log).read())
        torch_version = found.group(1) if found else None
    results = dict(
        dry_run=bool(args.dry_run), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        commit=git("rev-parse", "--short", "HEAD"), torch=torch_version, gpu=gpu, driver=driver,
        kit=" ".join(open(kit_env).read().split()) if os.path.exists(kit_env) else None,
        seconds=args.seconds, steps=read_steps(os.path.join(args.work, "steps.tsv")),
        tests=read_tests(os.path.join(args.work, "tests.xml")), bench=bench)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    summary = markdown(results)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(summary)
    print(summary)


if __name__ == "__main__":
    main()
