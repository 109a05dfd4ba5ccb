"""dev/ (the kernel workshop): every CPU variant of the loss and the conv builds and matches
unet_ext.reference at several settings, the workshop command runs end to end, a variant that is
wrong is caught before it is timed, and the CUDA variant files compile (nvcc; run on the GPU lease)."""
import os
import subprocess
import sys

import pytest
import torch

from dev import conv, harness, loss

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bound(workshop):
    workshop.bind(harness.load(harness.build(workshop.source, workshop.defines, verbose=False)))
    return workshop


@pytest.mark.parametrize("shape", [(2, 3, 9, 11), (1, 2, 40, 40), (1, 21, 5, 7)])
def test_loss_variants_match_reference(shape):
    w = _bound(loss.Loss("cpu", shape, threads=2))
    assert w.library_setting == (256 if shape[1] <= 64 else w.library_setting)
    for variant in w.variants:
        for block in (1, 8, 64, w.library_setting, 1000):
            w.check(variant, block)


@pytest.mark.parametrize("shape", [(1, 3, 8, 9, 5, 3), (2, 4, 12, 10, 7, 1), (1, 2, 6, 6, 3, 5)])
def test_conv_variants_match_reference(shape):
    w = _bound(conv.Conv("cpu", shape, threads=2))
    for variant in w.variants:
        for setting in ((1, 1), (4, 3), (16, 8)):
            w.check(variant, setting)


def test_a_wrong_result_is_caught_before_timing():
    w = _bound(loss.Loss("cpu", (1, 2, 8, 8), threads=1))
    w.run(2, 64)
    want = torch.logsumexp(w.logits.double(), 1).flatten(1)
    harness.validate("v2 lse", w.lse, want, 1e-5, 1e-5)
    with pytest.raises(AssertionError, match="1 of 64 values differ"):
        harness.validate("v2 lse", w.lse + torch.eye(1, 64) * 1e-3, want, 1e-5, 1e-5)
    with pytest.raises(RuntimeError, match="error -1"):
        w.check(2, 0)  # an impossible setting: the sweep reports it and times nothing


def test_workshop_command():
    out = subprocess.run([sys.executable, "-m", "dev.loss", "--shape", "1,2,16,16", "--budget", "0.1",
                          "--sweep", "64,256", "--threads", "1"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "| v2 | B=256: library" in out.stdout and "| v4 B=64 |" in out.stdout
    assert "the library's kernel and setting" in out.stdout and "best: v" in out.stdout
    out = subprocess.run([sys.executable, "-m", "dev.conv", "--shape", "1,2,8,8,3,3", "--budget", "0.1",
                          "--no-sweep"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "| v3 | TCOxR=8x4" in out.stdout and "| stock |" in out.stdout


@pytest.mark.skipif(harness.nvcc() is None, reason="no nvcc")
def test_cuda_variants_compile(tmp_path):
    for module in ("dev.loss", "dev.conv"):
        out = subprocess.run([sys.executable, "-m", module, "--device", "cuda", "--build-only", "--build-dir",
                              str(tmp_path)], capture_output=True, text=True, cwd=REPO,
                             env=dict(os.environ, DEV_CUDA_ARCH="sm_90a"))
        assert out.returncode == 0, out.stderr
        assert "warning" not in out.stdout.lower(), out.stdout  # no spills, no warnings
        assert out.stdout.strip().splitlines()[-1].endswith(".so")
