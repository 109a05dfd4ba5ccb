"""The GPU lease kit's summary (scripts/device_summary.py), from a made-up lease run: the steps,
the tests' counts and failures from JUnit XML, every benchmark row with tiles/s for the UNet, and
a run with nothing but failed steps still gives a summary. (The kit itself is built and dry-run
in CI: .ci/run.)"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUMMARY = os.path.join(ROOT, "scripts", "device_summary.py")

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_conv_cuda" name="test_a[float16]" time="0.1"/>
<testcase classname="tests.test_conv_cuda" name="test_b[bfloat16]" time="0.1">
  <failure message="AssertionError: 3.0 &lt;= 1.0">trace</failure></testcase>
<testcase classname="tests.test_max_pool" name="test_c" time="0.0"><skipped message="no GPU"/></testcase>
</testsuite></testsuites>"""


def _row(impl, median_ms, speedup, shape="UNet base 64 572x572 b8", op="unet train step"):
    return dict(op=op, shape=shape, dtype="bfloat16", layout="channels_last", mode="train", impl=impl,
                median_ms=median_ms, p20_ms=median_ms, p80_ms=median_ms, iters=5, gb_s=None,
                tflop_s=None, peak_mib=None, speedup=speedup, check="ok")


def _summarise(tmp_path, work_files):
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "bench-unet").mkdir(parents=True)
    out.mkdir()
    for name, text in work_files.items():
        (work / name).write_text(text)
    kit = tmp_path / "kit"
    kit.mkdir()
    (kit / "kit.env").write_text("KIT_TORCH=2.11.0\nKIT_ARCH=9.0a\n")
    subprocess.run([sys.executable, SUMMARY, "--work", str(work), "--out", str(out), "--seconds", "421",
                    "--kit", str(kit)], check=True, capture_output=True, text=True, cwd=ROOT)
    return (out / "summary.md").read_text(), json.loads((out / "results.json").read_text())


def test_summary_of_a_lease_run(tmp_path):
    bench = {"meta": {"device_name": "NVIDIA H200"},
             "rows": [_row("unet_ext", 400.0, 1.0), _row("stock", 500.0, 1.25)]}
    summary, results = _summarise(tmp_path, {
        "steps.tsv": "library\tPASS (prebuilt)\t3\timport unet_ext\ntests-cuda\tFAIL (exit 1)\t95\tpytest -m cuda\n",
        "tests.xml": JUNIT,
        "setup.log": "| NVIDIA-SMI 580.65 Driver Version: 580.65.06 CUDA Version: 13.0 |\n"
                     "python 3.12.3 torch 2.11.0+cu130 CUDA 13.0 GPU NVIDIA H200\n",
        "bench-unet/results-20261129T000000-cuda.json": json.dumps(bench),
    })
    assert results["gpu"] == "NVIDIA H200" and results["driver"] == "580.65.06"
    assert results["torch"] == "2.11.0+cu130" and results["seconds"] == 421
    assert [s["name"] for s in results["steps"]] == ["library", "tests-cuda"]
    tests = results["tests"]
    assert (tests["passed"], tests["failures"], tests["skipped"]) == (1, 1, 1)
    assert "test_b[bfloat16]" in tests["failed"][0] and "3.0 <= 1.0" in tests["failed"][0]
    assert results["bench"]["rows"][0]["tiles_per_s"] == 20.0  # 8 tiles in 0.4 s
    assert "| tests-cuda | FAIL (exit 1) | 95 |" in summary
    assert "1.25x" in summary and "| 20.0 |" in summary and "KIT_TORCH=2.11.0" in summary


def test_summary_when_everything_failed(tmp_path):
    summary, results = _summarise(tmp_path, {"steps.tsv": "library\tFAIL (no sm_90a)\t0\timport unet_ext\n"})
    assert results["tests"] is None and results["bench"] is None and results["gpu"] is None
    assert "| library | FAIL (no sm_90a) | 0 |" in summary
