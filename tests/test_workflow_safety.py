"""`unet-ext train` / `predict` never lose or overwrite what a user has, refuse broken or hostile
input with one line and exit code 2, and do not silently compute the wrong thing: run folders,
output collisions, checkpoint durability, resume options, persistent DataLoader workers, lossy
masks, non-finite pixels, absurd or pickled checkpoints, DDP teardown (issue 12)."""
import errno
import hashlib
import json
import os

import numpy as np
import pytest
import torch

from unet_ext import data, train as train_module
from unet_ext.__main__ import main as cli

from conftest import assert_usage_error
from unet_ext._cli import UsageError
from unet_ext._unet_shape import check_model_config, parameter_count

TINY = ["--base-channels", "4", "--depth", "2", "--tile-size", "60", "--batch-size", "2",
        "--steps", "2", "--no-progress"]


def _blobs(seed, shape=(70, 90)):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    labels = np.zeros(shape, np.int32)
    for k in range(1, 9):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 < rng.uniform(9, 30)] = k
    image = (labels > 0) * 180.0 + rng.normal(20, 5, shape)
    return np.clip(image, 0, 255).astype(np.uint8), labels


def _folder(root, images, mask_suffix="tif"):
    """root/images/<name> and root/masks/<stem>.<mask_suffix> from {name: image array}."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for k, (name, image) in enumerate(images.items()):
        data.write_image(str(root / "images" / name), image)
        labels = _blobs(k, image.shape[:2])[1].astype(np.uint16)
        stem = os.path.splitext(name)[0]
        if mask_suffix in ("jpg", "jpeg"):
            from PIL import Image
            Image.fromarray(labels.astype(np.uint8)).save(root / "masks" / f"{stem}.{mask_suffix}")
        else:
            data.write_image(str(root / "masks" / f"{stem}.{mask_suffix}"), labels)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _folder(tmp_path_factory.mktemp("data"), {f"cells{i}.png": _blobs(i)[0] for i in range(2)})


@pytest.fixture(scope="module")
def run(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert cli(["train", str(folder), "-o", str(out), "--epochs", "1"] + TINY) == 0
    return out



def _snapshot(folder):
    """{name: sha256} of every file in the folder (recursively)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# Data loss


def test_train_refuses_a_folder_that_holds_a_run(folder, run, capsys):
    before = _snapshot(run)
    assert_usage_error(capsys, ["train", str(folder), "-o", str(run), "--epochs", "1"] + TINY,
                 "already holds a run", "--resume", "--overwrite")
    assert _snapshot(run) == before
    # A single leftover file of a run is enough to refuse.
    partial = run.parent / "partial_run"
    partial.mkdir()
    (partial / "history.json").write_text("[]")
    assert_usage_error(capsys, ["train", str(folder), "-o", str(partial)] + TINY, "history.json")
    assert (partial / "history.json").read_text() == "[]"


def test_train_overwrite_replaces_and_resume_continues_in_place(folder, run, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("last.pt", "best.pt", "history.json"):
        (copy / name).write_bytes((run / name).read_bytes())
    # --resume of the folder's own checkpoint continues that run in place.
    assert cli(["train", str(folder), "-o", str(copy), "--epochs", "2", "--resume",
                str(copy / "last.pt")] + TINY) == 0
    assert [h["epoch"] for h in json.loads((copy / "history.json").read_text())] == [1, 2]
    # --overwrite starts afresh.
    assert cli(["train", str(folder), "-o", str(copy), "--epochs", "1", "--overwrite"] + TINY) == 0
    assert [h["epoch"] for h in json.loads((copy / "history.json").read_text())] == [1]


def test_train_resume_into_another_run_is_refused(folder, run, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "last.pt").write_bytes(b"someone else's run")
    assert_usage_error(capsys, ["train", str(folder), "-o", str(other), "--epochs", "2", "--resume",
                          str(run / "last.pt")] + TINY, "already holds a run")
    assert (other / "last.pt").read_bytes() == b"someone else's run"


def test_out_naming_an_existing_file_is_refused(folder, run, tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    assert_usage_error(capsys, ["train", str(folder), "-o", str(target)] + TINY, "existing file")
    image = str(folder / "images" / "cells0.png")
    assert_usage_error(capsys, ["predict", str(run / "last.pt"), image, "-o", str(target)], "existing file")
    assert target.read_text() == "keep me"


def _predict(run, images, out, *extra):
    return ["predict", str(run / "last.pt"), *map(str, images), "-o", str(out), "--tile-size", "60",
            "--no-progress", *extra]


def test_predict_refuses_inputs_whose_outputs_collide(run, tmp_path, capsys):
    image = _blobs(3)[0]
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        data.write_image(str(tmp_path / sub / "img.tif"), image)
    data.write_image(str(tmp_path / "a" / "img.png"), image)
    out = tmp_path / "out"
    assert_usage_error(capsys, _predict(run, [tmp_path / "a" / "img.tif", tmp_path / "b" / "img.tif"], out),
                 "a/img.tif", "b/img.tif", "img_seg.tif")
    assert_usage_error(capsys, _predict(run, [tmp_path / "a" / "img.png", tmp_path / "a" / "img.tif"], out,
                                  "--prob"), "img_seg.tif")
    assert not out.exists()  # refused before anything was written


def test_predict_never_replaces_an_input(run, tmp_path, capsys):
    x = tmp_path / "x.tif"
    x_seg = tmp_path / "x_seg.tif"
    data.write_image(str(x), _blobs(3)[0])
    data.write_image(str(x_seg), _blobs(4)[0])
    before = _snapshot(tmp_path)
    assert_usage_error(capsys, _predict(run, [x, x_seg], tmp_path), "would replace the input", "x_seg.tif")
    # Not even with --overwrite.
    assert_usage_error(capsys, _predict(run, [x, x_seg], tmp_path, "--overwrite"), "would replace the input")
    assert _snapshot(tmp_path) == before


def test_predict_replaces_an_existing_output_only_with_overwrite(run, tmp_path, capsys):
    x = tmp_path / "x.tif"
    data.write_image(str(x), _blobs(3)[0])
    out = tmp_path / "out"
    out.mkdir()
    (out / "x_seg.tif").write_bytes(b"an earlier result")
    assert_usage_error(capsys, _predict(run, [x], out), "already exist", "--overwrite")
    assert (out / "x_seg.tif").read_bytes() == b"an earlier result"
    assert cli(_predict(run, [x], out, "--overwrite")) == 0
    assert data.read_image(str(out / "x_seg.tif")).shape == (70, 90)


def test_checkpoint_is_fsynced_before_the_rename_and_its_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", None))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    train_module.save_checkpoint(str(tmp_path / "last.pt"), {"x": torch.ones(3)})
    assert events == [("fsync", False), ("replace", None), ("fsync", True)], events
    assert torch.equal(torch.load(tmp_path / "last.pt", weights_only=True)["x"], torch.ones(3))


def test_failed_checkpoint_save_removes_its_temporary_and_keeps_the_previous(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    train_module.save_checkpoint(str(path), {"epoch": 1})
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        train_module.save_checkpoint(str(path), {"epoch": 2})
    monkeypatch.setattr(torch, "save", real_save)
    assert os.listdir(tmp_path) == ["last.pt"]
    assert torch.load(path, weights_only=True) == {"epoch": 1}


# ---------------------------------------------------------------------------------------------
# Wrong results


def test_dataloader_workers_see_every_epoch():
    """A persistent worker keeps the dataset of its first fork: set_epoch never reaches it and
    each epoch replays epoch 0. The training loader must give each epoch its own crops."""
    image, labels = _blobs(0)
    dataset = data.SegmentationDataset(data.normalize(image), labels, 60, 20, epoch_length=4, seed=0)
    loader = train_module.make_loader(dataset, batch_size=2, workers=1)
    for epoch in range(3):
        dataset.set_epoch(epoch)
        first = next(iter(loader))[0]
        expected = torch.stack([dataset[0][0], dataset[1][0]])
        torch.testing.assert_close(first, expected, rtol=0, atol=0)


def test_resume_honours_lr(folder, run, tmp_path):
    out = tmp_path / "resumed"
    assert cli(["train", str(folder), "-o", str(out), "--epochs", "2", "--lr", "0.25",
                "--resume", str(run / "last.pt")] + TINY) == 0
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    assert [g["lr"] for g in checkpoint["optimizer"]["param_groups"]] == [0.25]
    # Without --lr the saved rate stays.
    out2 = tmp_path / "resumed2"
    assert cli(["train", str(folder), "-o", str(out2), "--epochs", "2",
                "--resume", str(run / "last.pt")] + TINY) == 0
    checkpoint = torch.load(out2 / "last.pt", weights_only=True)
    assert [g["lr"] for g in checkpoint["optimizer"]["param_groups"]] == [1e-3]


def test_resume_with_another_optimizer_is_refused_and_the_saved_one_is_kept(folder, run, tmp_path, capsys):
    assert_usage_error(capsys, ["train", str(folder), "-o", str(tmp_path / "x"), "--epochs", "2",
                          "--optimizer", "sgd", "--resume", str(run / "last.pt")] + TINY,
                 "--optimizer adam", "--optimizer sgd")
    assert not (tmp_path / "x").exists()
    sgd = tmp_path / "sgd"
    assert cli(["train", str(folder), "-o", str(sgd), "--epochs", "1", "--optimizer", "sgd"] + TINY) == 0
    # No --optimizer: the checkpoint's (sgd) is used, not the default adam (KeyError 'momentum').
    assert cli(["train", str(folder), "-o", str(sgd), "--epochs", "2", "--resume",
                str(sgd / "last.pt")] + TINY) == 0
    checkpoint = torch.load(sgd / "last.pt", weights_only=True)
    assert checkpoint["args"]["optimizer"] == "sgd" and checkpoint["epoch"] == 2


def test_lossy_masks_are_refused(tmp_path, capsys):
    root = _folder(tmp_path / "jpg", {"a.png": _blobs(0)[0]}, mask_suffix="jpg")
    assert_usage_error(capsys, ["train", str(root), "-o", str(tmp_path / "o")] + TINY, "a.jpg", "lossless")
    with pytest.raises(ValueError, match="lossless"):
        data.read_labels(str(root / "masks" / "a.jpg"))


def test_lossy_labels_are_refused_by_predict(run, tmp_path, capsys):
    x = tmp_path / "x.tif"
    data.write_image(str(x), _blobs(3)[0])
    from PIL import Image
    Image.fromarray(_blobs(3)[1].astype(np.uint8)).save(tmp_path / "x_mask.jpg")
    assert_usage_error(capsys, _predict(run, [x], tmp_path / "o", "--labels", str(tmp_path / "x_mask.jpg")),
                 "x_mask.jpg", "lossless")
    assert not (tmp_path / "o").exists()


def test_non_finite_pixels_are_refused_naming_the_file(run, tmp_path, capsys):
    image = _blobs(0)[0].astype(np.float32)
    image[5, 7] = np.nan
    root = _folder(tmp_path / "nan", {"good.tif": _blobs(1)[0].astype(np.float32), "bad.tif": image})
    assert_usage_error(capsys, ["train", str(root), "-o", str(tmp_path / "o")] + TINY, "bad.tif", "non-finite")
    inf = image.copy()
    inf[5, 7] = np.inf
    data.write_image(str(tmp_path / "inf.tif"), inf)
    assert_usage_error(capsys, _predict(run, [tmp_path / "inf.tif"], tmp_path / "p"), "inf.tif", "non-finite")
    with pytest.raises(ValueError, match="non-finite"):
        data.normalize(image)


# ---------------------------------------------------------------------------------------------
# Crashes that must be one line and exit code 2


def test_broken_input_is_one_line_and_exit_2(folder, run, tmp_path, capsys):
    notdict = tmp_path / "list.pt"
    torch.save([1, 2, 3], notdict)
    assert_usage_error(capsys, ["train", str(folder), "-o", str(tmp_path / "a"), "--resume", str(notdict)] + TINY,
                 "list.pt", "not a unet-ext training checkpoint")
    corrupt = tmp_path / "corrupt.tif"
    corrupt.write_bytes(b"II*\x00garbage")
    assert_usage_error(capsys, _predict(run, [folder / "images" / "cells0.png"], tmp_path / "b",
                                  "--labels", str(corrupt)), "corrupt.tif")
    narrow = _folder(tmp_path / "narrow", {"thin.png": _blobs(0, (70, 1))[0]})
    assert_usage_error(capsys, ["train", str(narrow), "-o", str(tmp_path / "c")] + TINY, "thin.png",
                 "--val-fraction")
    rgb = np.stack([_blobs(1)[0]] * 3, axis=-1)
    mixed = _folder(tmp_path / "mixed", {"a_gray.png": _blobs(0)[0], "b_rgb.png": rgb})
    assert_usage_error(capsys, ["train", str(mixed), "-o", str(tmp_path / "d")] + TINY, "b_rgb.png",
                 "a_gray.png", "channel")
    assert_usage_error(capsys, ["train", str(folder), "-o", str(tmp_path / "e"), "--workers", "-1"] + TINY,
                 "--workers")
    assert_usage_error(capsys, ["train", str(folder), "-o", str(tmp_path / "f"), "--base-channels",
                          str(2 ** 20), "--depth", "2", "--tile-size", "60"], "parameters")


ABSURD = [
    ({"base_channels": 2 ** 20, "depth": 12}, "depth"),
    ({"base_channels": 2 ** 20}, "parameters"),
    ({"depth": 0}, "depth"),
    ({"base_channels": "16"}, "base_channels"),
    ({"in_channels": True}, "in_channels"),
    ({"padding": "reflect"}, "padding"),
    ({"dropout": float("nan")}, "dropout"),
]


@pytest.mark.parametrize("change,fragment", ABSURD, ids=[f for _, f in ABSURD])
def test_absurd_model_configs_are_refused_before_building(run, folder, tmp_path, capsys, change, fragment,
                                                          monkeypatch):
    checkpoint = torch.load(run / "last.pt", weights_only=True)
    checkpoint["model_config"] = {**checkpoint["model_config"], **change}
    path = tmp_path / "absurd.pt"
    torch.save(checkpoint, path)
    import unet_ext

    def no_build(*args, **kwargs):
        raise AssertionError("a model was built from an absurd config")

    monkeypatch.setattr(unet_ext, "UNet", no_build)
    assert_usage_error(capsys, ["predict", str(path), str(folder / "images" / "cells0.png"), "-o",
                          str(tmp_path / "o")], "absurd.pt", fragment)
    assert_usage_error(capsys, ["train", str(folder), "-o", str(tmp_path / "r"), "--resume", str(path)] + TINY,
                 "absurd.pt", fragment)


def test_parameter_count_matches_the_model():
    from unet_ext import UNet

    for args in [(1, 2, 4, 2), (3, 5, 8, 3), (1, 2, 64, 4)]:
        model = UNet(*args)
        assert parameter_count(*args) == sum(p.numel() for p in model.parameters())
    check_model_config({"in_channels": 1, "num_classes": 2, "base_channels": 64, "depth": 4,
                        "padding": "valid", "dropout": 0.0})


class _Payload:
    """Unpickling this runs os.mkdir(path): what a hostile checkpoint would do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_a_checkpoint_carrying_code_is_refused_without_running_it(run, folder, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    checkpoint = torch.load(run / "last.pt", weights_only=True)
    checkpoint["extra"] = _Payload(str(marker))
    torch.save(checkpoint, evil)
    assert_usage_error(capsys, ["predict", str(evil), str(folder / "images" / "cells0.png"), "-o",
                          str(tmp_path / "o")], "evil.pt")
    assert_usage_error(capsys, ["train", str(folder), "-o", str(tmp_path / "t"), "--resume", str(evil)] + TINY,
                 "evil.pt")
    assert not marker.exists()
    # A torch whose weights_only loader can run code is refused outright.
    with pytest.raises(UsageError, match="CVE-2025-32434"):
        train_module._check_safe_torch("2.5.1+cpu")
    train_module._check_safe_torch("2.6.0")
    train_module._check_safe_torch(torch.__version__)


def test_ddp_process_group_is_torn_down_when_training_fails(folder, tmp_path, monkeypatch):
    import torch.distributed as dist

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: calls.append("init"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a, **k: calls.append("destroy"))

    def failing(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(train_module, "_train", failing)
    args = train_module.build_parser().parse_args([str(folder), "-o", str(tmp_path / "o"), "--device",
                                                   "cpu"] + TINY)
    with pytest.raises(RuntimeError, match="boom"):
        train_module.train(args)
    assert calls == ["init", "destroy"]
