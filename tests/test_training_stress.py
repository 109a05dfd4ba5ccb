"""Training under stress (issue 12): memory stays flat over a few hundred steps, and a run killed
(SIGKILL) in the middle of writing a checkpoint leaves the previous checkpoint loadable and
`--resume` continues from it. Each runs in a subprocess."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import torch

from unet_ext import data
from unet_ext.__main__ import main as cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--base-channels", "4", "--depth", "2", "--tile-size", "60", "--batch-size", "2",
        "--steps", "2", "--no-progress"]


def run_python(code, timeout=300):
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                            text=True, timeout=timeout)
    return result


def test_rss_stays_flat_over_300_training_steps():
    """Steps 50 to 300 of a small UNet: no growth beyond 8 MiB (caches are warm by step 50)."""
    result = run_python("""
        import torch, unet_ext
        from unet_ext.ops import weighted_cross_entropy
        def rss():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * 4096 / 2**20
        torch.manual_seed(0)
        torch.set_num_threads(1)  # no OpenMP spinning against a busy machine; memory is the point
        model = unet_ext.UNet(1, 2, base_channels=4, depth=2)
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        x = torch.randn(2, 1, 60, 60)
        target = torch.randint(0, 2, (2, 20, 20))
        w = torch.rand(2, 20, 20)
        samples = []
        for step in range(300):
            loss = weighted_cross_entropy(model(x), target, w)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step in (50, 299):
                samples.append(rss())
        print(*samples)
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    early, late = map(float, result.stdout.split())
    assert late - early < 8, (early, late)


def _folder(root):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:70, :90]
    labels = np.zeros((70, 90), np.uint16)
    for k in range(1, 9):
        labels[(yy - rng.uniform(5, 65)) ** 2 + (xx - rng.uniform(5, 85)) ** 2 < 25] = k
    image = np.clip((labels > 0) * 180.0 + rng.normal(20, 5, labels.shape), 0, 255).astype(np.uint8)
    data.write_image(str(root / "images" / "a.png"), image)
    data.write_image(str(root / "masks" / "a.tif"), labels)
    return root


def test_a_run_killed_while_saving_a_checkpoint_resumes_from_the_last_good_one(tmp_path):
    folder, out = _folder(tmp_path / "data"), tmp_path / "run"
    # The third checkpoint write (epoch 2's last.pt; epoch 1 wrote last.pt and best.pt) is killed
    # halfway through, as a power cut or the OOM killer would.
    result = run_python(f"""
        import os, signal, torch
        from unet_ext import train
        saves = 0
        real_save = torch.save
        def save(obj, f, *args, **kwargs):
            global saves
            saves += 1
            if saves == 3:
                f.write(b"half a checkpoint")
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, f, *args, **kwargs)
        torch.save = save
        train.main({[str(folder), "-o", str(out), "--epochs", "3"] + TINY!r})
    """)
    assert result.returncode == -9, result.stderr[-3000:]
    assert [p for p in os.listdir(out) if ".tmp" in p]  # the killed write's temporary
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 1
    assert cli(["train", str(folder), "-o", str(out), "--epochs", "3", "--resume", str(out / "last.pt")]
               + TINY) == 0
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert not [p for p in os.listdir(out) if ".tmp" in p]  # removed when the run resumed
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 3
