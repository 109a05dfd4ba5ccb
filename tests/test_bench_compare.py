"""benchmarks/compare.py (`python -m benchmarks.run --compare OLD NEW`) on synthetic result files:
ratios, noise bands from p20/p80, regressions flagged only beyond noise and tolerance, the
load-normalised speedup metric; and the small-multiples chart of harness.bar_chart."""
import json
import os
import subprocess
import sys

import pytest

from benchmarks import compare, harness

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def row(op, impl, median, spread=0.02, mode="forward", shape="(1, 2, 8, 8)"):
    return dict(op=op, shape=shape, dtype="float32", layout="contiguous", mode=mode, impl=impl,
                median_ms=median, p20_ms=median * (1 - spread), p80_ms=median * (1 + spread), iters=50,
                gb_s=1.0, tflop_s=None, peak_mib=1.0, speedup=None, check="ok")


def run_file(tmp_path, name, rows, device_name="CPU (2 threads)"):
    for r in rows:  # speed-up = impl median / ours, as harness.bench_case
        ours = next(o for o in rows if o["impl"] == "unet_ext" and all(o[k] == r[k] for k in compare.KEY))
        r["speedup"] = round(r["median_ms"] / ours["median_ms"], 3)
    path = tmp_path / name
    path.write_text(json.dumps({"meta": {"device_name": device_name, "unet_ext_commit": name, "date": "d",
                                         "torch": "t"}, "rows": rows}))
    return str(path)


def test_ratios_bands_and_verdicts():
    old = [row("a", "unet_ext", 10.0), row("a", "stock", 20.0),
           row("b", "unet_ext", 10.0), row("b", "stock", 20.0),
           row("c", "unet_ext", 10.0, spread=0.2), row("c", "stock", 20.0),
           row("d", "unet_ext", 10.0), row("d", "stock", 20.0),
           row("gone", "unet_ext", 1.0)]
    new = [row("a", "unet_ext", 13.0), row("a", "stock", 20.0),    # 1.3x slower, tight: regression
           row("b", "unet_ext", 7.0), row("b", "stock", 20.0),     # faster
           row("c", "unet_ext", 12.0, spread=0.2), row("c", "stock", 20.0),  # 1.2x but noisy: within noise
           row("d", "unet_ext", 10.3), row("d", "stock", 20.0),    # 3%: beyond noise, under tol
           row("new", "unet_ext", 1.0)]
    rows, only_old, only_new = compare.compare(old, new)
    by_op = {r["op"]: r for r in rows}
    assert by_op["a"]["verdict"] == "REGRESSION" and by_op["a"]["ratio"] == pytest.approx(1.3)
    assert by_op["a"]["low"] == pytest.approx(13 * 0.98 / (10 * 1.02))
    assert by_op["a"]["high"] == pytest.approx(13 * 1.02 / (10 * 0.98))
    assert by_op["b"]["verdict"] == "faster"
    assert by_op["c"]["verdict"] == "~" and by_op["c"]["low"] < 1 < by_op["c"]["high"]
    assert by_op["d"]["verdict"] == "~"
    assert rows[0]["op"] == "a"  # regressions first
    assert [k[0] for k in only_old] == ["gone"] and [k[0] for k in only_new] == ["new"]


def test_speedup_metric_cancels_machine_load():
    # Everything 30% slower in the new run (a busier machine): the time metric flags it, the
    # speedup metric (ours relative to stock, same run) does not.
    old = [row("a", "unet_ext", 10.0), row("a", "stock", 20.0)]
    new = [row("a", "unet_ext", 13.0), row("a", "stock", 26.0)]
    assert compare.compare(old, new, metric="time")[0][0]["verdict"] == "REGRESSION"
    rows = compare.compare(old, new, metric="speedup")[0]
    assert rows[0]["verdict"] == "~" and rows[0]["ratio"] == pytest.approx(1.0)
    # ... and catches a real one: ours slower while stock is not.
    new = [row("a", "unet_ext", 13.0), row("a", "stock", 20.0)]
    assert compare.compare(old, new, metric="speedup")[0][0]["verdict"] == "REGRESSION"


def test_command_line(tmp_path):
    old = run_file(tmp_path, "old.json", [row("a", "unet_ext", 10.0), row("a", "stock", 20.0),
                                          row("b", "unet_ext", 5.0, mode="forward+backward"),
                                          row("b", "stock", 5.0, mode="forward+backward")])
    new = run_file(tmp_path, "new.json", [row("a", "unet_ext", 15.0), row("a", "stock", 20.0),
                                          row("b", "unet_ext", 5.0, mode="forward+backward"),
                                          row("b", "stock", 5.0, mode="forward+backward")], device_name="GPU")
    for module in ("benchmarks.run", "benchmarks.compare"):
        args = [sys.executable, "-m", module] + (["--compare"] if module == "benchmarks.run" else []) + [old, new]
        out = subprocess.run(args, capture_output=True, text=True, cwd=REPO)
        assert out.returncode == 0, out.stderr
        assert "**REGRESSION**" in out.stdout and "2.00x -> 1.33x" in out.stdout
        assert "2 cases compared: 1 regression(s), 0 faster, 1 within noise" in out.stdout
        assert "WARNING: the two runs are on different devices" in out.stdout
        strict = subprocess.run(args + ["--strict"], capture_output=True, text=True, cwd=REPO)
        assert strict.returncode == 1
    missing = subprocess.run([sys.executable, "-m", "benchmarks.run", "--compare", old, str(tmp_path / "no.json")],
                             capture_output=True, text=True, cwd=REPO)
    assert missing.returncode == 2 and "no file" in missing.stderr


def test_small_multiples_chart(tmp_path):
    pytest.importorskip("matplotlib")
    rows = []
    for op, n in (("crop_concat", 3), ("conv2d_relu", 5)):
        for mode in ("forward", "forward+backward"):
            for i in range(n):
                rows += [row(op, "unet_ext", 1.0, mode=mode, shape=f"s{i}"),
                         row(op, "stock", 0.5 * (i + 1), mode=mode, shape=f"s{i}")]
    rows += [row("unet train step", "unet_ext", 1.0, mode="train"), row("unet train step", "stock", 1.1, mode="train")]
    for r in rows:
        r["speedup"] = r["median_ms"]
    path = harness.bar_chart(rows, str(tmp_path / "speedup.png"), "title")
    from PIL import Image

    width, height = Image.open(path).size
    assert width < 1600 and height < 1400  # 3 rows of panels, not one bar per row
