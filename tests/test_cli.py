"""`unet-ext train` / `unet-ext predict` end to end on tiny networks: checkpoints (atomic, with the
model config), resume, predict outputs and scores, one-line errors with exit code 2, DDP with
gloo and two processes; and the issue's bar: the default training on the nuclei image reaches a
validation foreground IoU >= 0.80."""
import importlib.util
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from unet_ext import data
from unet_ext.__main__ import main as cli

from conftest import assert_usage_error
from unet_ext.predict import load_model

HAS_NUCLEI = importlib.util.find_spec("stardist") is not None
needs_nuclei = pytest.mark.skipif(not HAS_NUCLEI, reason="pip install --no-deps stardist")
TINY = ["--base-channels", "4", "--depth", "2", "--tile-size", "60", "--batch-size", "2",
        "--steps", "2", "--no-progress"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _blobs(seed, shape=(70, 90)):
    """A synthetic image with bright disks and its instance labels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    labels = np.zeros(shape, np.int32)
    for k in range(1, 9):
        cy, cx = rng.uniform(5, shape[0] - 5), rng.uniform(5, shape[1] - 5)
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 < rng.uniform(9, 30)] = k
    image = (labels > 0) * 180.0 + rng.normal(20, 5, shape)
    return np.clip(image, 0, 255).astype(np.uint8), labels


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    for i in range(2):
        image, labels = _blobs(i)
        data.write_image(str(root / "images" / f"cells{i}.png"), image)
        data.write_image(str(root / "masks" / f"cells{i}.tif"), labels.astype(np.uint16))
    return root


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert cli(["train", str(folder), "-o", str(out), "--epochs", "2"] + TINY) == 0
    return out



def test_train_writes_checkpoints_curves_and_history(trained):
    for name in ("last.pt", "best.pt", "curves.png", "result.png", "history.json"):
        assert (trained / name).is_file(), name
    assert not [p for p in os.listdir(trained) if ".tmp" in p]  # atomic writes leave no temporaries
    history = json.loads((trained / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    for h in history:
        assert np.isfinite(h["loss"]) and 0.0 <= h["iou"] <= 1.0 and 0.0 <= h["f1"] <= 1.0
    checkpoint = torch.load(trained / "last.pt", weights_only=True)
    assert checkpoint["model_config"] == {"in_channels": 1, "num_classes": 2, "base_channels": 4,
                                          "depth": 2, "padding": "valid", "dropout": 0.0}
    model, _ = load_model(str(trained / "last.pt"))
    assert not model.training and model.output_size(60) == 20


def test_resume_checks_the_model(folder, trained, tmp_path, capsys):
    assert_usage_error(capsys, ["train", str(folder), "-o", str(tmp_path / "x"), "--resume",
                          str(trained / "last.pt"), "--base-channels", "8", "--depth", "2",
                          "--tile-size", "60"],
                 "different model", "base_channels=4")


def test_resume_appends_epochs(folder, trained, tmp_path):
    out = tmp_path / "resumed"
    assert cli(["train", str(folder), "-o", str(out), "--epochs", "3",
                "--resume", str(trained / "last.pt")] + TINY) == 0
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]


def test_predict_writes_maps_and_scores(folder, trained, tmp_path, capsys):
    image = folder / "images" / "cells0.png"
    mask = folder / "masks" / "cells0.tif"
    out = tmp_path / "pred"
    assert cli(["predict", str(trained / "best.pt"), str(image), "-o", str(out), "--prob",
                "--instances", "--labels", str(mask), "--tile-size", "60", "--no-progress"]) == 0
    line = capsys.readouterr().out
    assert "IoU" in line and "instance F1@0.5" in line
    seg = data.read_image(str(out / "cells0_seg.tif"))
    prob = data.read_image(str(out / "cells0_prob.tif"))
    inst = data.read_image(str(out / "cells0_instances.tif"))
    assert seg.shape == prob.shape == inst.shape == (70, 90)
    assert set(np.unique(seg)) <= {0, 1} and prob.dtype == np.float32
    assert ((prob >= 0) & (prob <= 1)).all()
    assert ((inst > 0) <= (seg == 1)).all()
    # PNG output, default tile size (fits the image)
    assert cli(["predict", str(trained / "best.pt"), str(image), "-o", str(out / "png"),
                "--format", "png", "--instances", "--no-progress"]) == 0
    assert data.read_image(str(out / "png" / "cells0_seg.png")).shape == (70, 90)


def test_predict_of_a_large_image_equals_tiles_of_any_size(trained, tmp_path):
    """Overlap-tile prediction through the CLI does not depend on the tile size (valid padding)."""
    image, _ = _blobs(5, (150, 131))
    path = tmp_path / "big.tif"
    data.write_image(str(path), image)
    maps = []
    for tile in ("60", "76"):
        out = tmp_path / tile
        assert cli(["predict", str(trained / "last.pt"), str(path), "-o", str(out), "--prob",
                    "--tile-size", tile, "--no-progress"]) == 0
        maps.append(data.read_image(str(out / "big_prob.tif")))
    np.testing.assert_allclose(maps[0], maps[1], atol=1e-5)


def test_usage_errors_are_one_line_with_exit_code_2(folder, trained, tmp_path, capsys):
    ckpt = str(trained / "last.pt")
    image = str(folder / "images" / "cells0.png")
    out = str(tmp_path / "o")
    assert_usage_error(capsys, ["predict", ckpt, str(tmp_path / "missing.tif"), "-o", out], "not found")
    assert_usage_error(capsys, ["predict", str(tmp_path / "none.pt"), image, "-o", out],
                 "checkpoint not found")
    bad = tmp_path / "bad.tif"
    bad.write_text("not an image")
    assert_usage_error(capsys, ["predict", ckpt, str(bad), "-o", out], "bad.tif")
    notckpt = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(1)}, notckpt)
    assert_usage_error(capsys, ["predict", str(notckpt), image, "-o", out], "not a unet-ext")
    assert_usage_error(capsys, ["predict", ckpt, image, "-o", out, "--tile-size", "62"],
                 "--tile-size", "use 60 or 64")
    small = tmp_path / "small.tif"
    data.write_image(str(small), np.zeros((10, 10), np.uint16))
    assert_usage_error(capsys, ["predict", ckpt, image, "-o", out, "--labels", str(small)],
                 "small.tif", "(10, 10)")
    rgb = tmp_path / "rgb.png"
    data.write_image(str(rgb), np.zeros((20, 20, 3), np.uint8))
    assert_usage_error(capsys, ["predict", ckpt, str(rgb), "-o", out], "3 channel(s)", "takes 1")
    assert_usage_error(capsys, ["train", str(tmp_path / "nowhere"), "-o", out], "not found")
    assert_usage_error(capsys, ["train", str(folder), "-o", out, "--tile-size", "570"],
                 "--tile-size", "use 556 or 572")
    assert_usage_error(capsys, ["train", str(folder), "-o", out, "--epochs", "0"], "--epochs")
    assert_usage_error(capsys, ["train", "--optimizer", "lbfgs"], "invalid choice")
    assert_usage_error(capsys, ["frobnicate"], "invalid choice")
    (tmp_path / "nomask" / "images").mkdir(parents=True)
    (tmp_path / "nomask" / "masks").mkdir()
    data.write_image(str(tmp_path / "nomask" / "images" / "a.png"), np.zeros((8, 8), np.uint8))
    assert_usage_error(capsys, ["train", str(tmp_path / "nomask"), "-o", out], "a.png")


def test_train_under_torchrun_with_two_gloo_processes(folder, tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
         "-m", "unet_ext", "train", str(folder), "-o", str(out), "--epochs", "1",
         "--device", "cpu"] + TINY,
        capture_output=True, text=True, env=env, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 2 process(es)" in result.stdout
    assert result.stdout.count("epoch   1/1") == 1  # only rank 0 reports
    assert (out / "last.pt").is_file()


@needs_nuclei
def test_default_training_reaches_the_issue_bar_on_the_nuclei_image(tmp_path):
    """The issue's bar: `unet-ext train` with its defaults (a few minutes on this 2-core CPU)
    reaches a validation foreground IoU >= 0.80; here with 6 of its 12 epochs to keep CI short.
    (4 epochs sat on the bar: builds that differ by float32 rounding alone gave a best of 0.789,
    0.805, 0.823 and 0.842, the chaotic run-to-run swing of +-0.05 the README notes.)"""
    out = tmp_path / "nuclei"
    assert cli(["train", "-o", str(out), "--epochs", "6", "--no-progress"]) == 0
    history = json.loads((out / "history.json").read_text())
    best = max(h["iou"] for h in history)
    assert best >= 0.80, history
