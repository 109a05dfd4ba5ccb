"""`unet-ext train`: the paper's training on the fused UNet. Random tiles with the eq. 2 weight
map, flips/rotations/gray values/elastic deformation, the fused weighted cross-entropy, SGD
(momentum 0.99, the paper) or Adam, optional autocast; validation by overlap-tile prediction
every epoch (foreground IoU, Dice, instance F1 at IoU 0.5); atomic checkpoints that carry the
model config, a loss/IoU curve and a result figure. Under `torchrun` it trains with DDP.

Data: a folder with images/ and masks/ (instance labels, matched by file name), or by default
the stardist wheel's 512x512 nuclei image; the right `--val-fraction` of each image's width is
held out for validation.
"""
import json
import os
import time

import numpy as np
import torch

from ._cli import Parser, UsageError, run
from ._unet_shape import check_input_size, check_model_config

__all__ = ["main", "build_parser", "MODEL_KEYS", "make_loader", "save_checkpoint", "load_checkpoint"]

# Arguments that define the network: stored in checkpoints; `predict` and `--resume` rebuild it.
MODEL_KEYS = ("in_channels", "num_classes", "base_channels", "depth", "padding", "dropout")


def build_parser(prog="unet-ext train"):
    p = Parser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("data", nargs="?", default=None,
                   help="folder with images/ and masks/ (default: the stardist nuclei image)")
    p.add_argument("-o", "--out", default="runs/nuclei",
                   help="output folder (checkpoints, curves); a folder that holds a run is refused "
                        "unless --resume continues that run or --overwrite is given")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run in --out (its checkpoints, history and figures)")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--steps", type=int, default=25, help="optimizer steps per epoch")
    p.add_argument("--batch-size", type=int, default=4, help="tiles per step (per process)")
    p.add_argument("--tile-size", type=int, default=None,
                   help="input tile size (default: 252 for valid padding, 128 for same)")
    p.add_argument("--lr", type=float, default=None,
                   help="default 1e-3 (adam), 1e-2 (sgd); with --resume: the checkpoint's, unless given")
    p.add_argument("--optimizer", choices=("adam", "sgd"), default=None,
                   help="adam (default), or sgd with momentum 0.99 as the paper; with --resume: the "
                        "checkpoint's (another one is refused)")
    p.add_argument("--amp", choices=("off", "bf16", "fp16"), default="off",
                   help="autocast dtype (fp16 uses a gradient scaler; CUDA only)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--resume", default=None, help="checkpoint to continue from")
    p.add_argument("--base-channels", type=int, default=16, help="64 is the paper's network")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--padding", choices=("valid", "same"), default="valid")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--w0", type=float, default=10.0, help="weight map border weight (eq. 2)")
    p.add_argument("--sigma", type=float, default=5.0, help="weight map border width (eq. 2)")
    p.add_argument("--val-fraction", type=float, default=0.25,
                   help="right part of each image's width held out for validation")
    p.add_argument("--min-size", type=int, default=15,
                   help="drop predicted instances smaller than this (pixels)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv=None, prog="unet-ext train"):
    args = build_parser(prog).parse_args(argv)
    return run(prog, train, args)


# ---------------------------------------------------------------------------------------------
# Setup helpers


def _validate(args):
    for name in ("epochs", "steps", "batch_size", "base_channels", "depth"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    if not 0.0 < args.val_fraction < 1.0:
        raise UsageError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    if args.tile_size is None:
        args.tile_size = 252 if args.padding == "valid" else 128
    try:
        check_input_size(args.tile_size, args.depth, args.padding)
    except ValueError as error:
        raise UsageError(f"--tile-size: {error}") from None
    if args.padding == "same" and args.tile_size % 2 ** args.depth:
        raise UsageError(f"--tile-size must be a multiple of {2 ** args.depth} for same padding")
    try:
        check_model_config(_model_config(args, 1))
    except ValueError as error:
        raise UsageError(f"--base-channels/--depth: {error}") from None


def _device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device: unknown device {name!r} (use auto, cpu or cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    return device


def _load_data(args):
    """(train, val) lists of (image (C, H, W) float32, labels (H, W)) and a data description."""
    from . import data

    if args.data is None:
        image, labels = data.load_nuclei()
        pairs, source = [(image, labels)], "stardist nuclei image (DSB 2018, Caicedo et al. 2019)"
    else:
        if not os.path.isdir(args.data):
            raise UsageError(f"data folder not found: {args.data}")
        try:
            images, masks, names = data.load_folder(args.data)
        except ValueError as error:
            raise UsageError(str(error)) from None
        pairs = list(zip(images, masks))
        if not pairs:
            raise UsageError(f"no image/mask pairs in {args.data} (expected images/ and masks/)")
        source = args.data
        folder = os.path.join(args.data, "images")
        files = {os.path.splitext(f)[0]: os.path.join(folder, f) for f in os.listdir(folder)
                 if os.path.splitext(f)[1].lower() in data.IMAGE_SUFFIXES}
        names = [files.get(n, n) for n in names]  # the image files, for messages
    if args.data is None:
        names = [source]
    train, val = [], []
    for name, (image, labels) in zip(names, pairs):
        try:
            image = data.normalize(image)
        except ValueError as error:
            raise UsageError(f"{name}: {error}") from None
        if train and image.shape[0] != train[0][0].shape[0]:
            raise UsageError(f"{name} has {image.shape[0]} channel(s), {names[0]} has "
                             f"{train[0][0].shape[0]}: all images of a folder need the same "
                             "number (all gray or all RGB)")
        try:
            (ti, tl), (vi, vl) = data.split_image(image, labels, 1.0 - args.val_fraction)
        except ValueError:
            raise UsageError(f"{name} is {labels.shape[1]} pixels wide: --val-fraction "
                             f"{args.val_fraction} leaves an empty training or validation part") from None
        train.append((ti, tl))
        val.append((vi, vl))
    return train, val, source


# What a run writes into --out: a folder holding any of these holds a run.
RUN_FILES = ("last.pt", "best.pt", "history.json", "curves.png", "result.png")


def _check_out(args):
    """Refuses, before anything is written, an --out that is a file, or a folder holding a run
    that this command would overwrite: allowed are an empty or new folder, --overwrite, and
    --resume of a checkpoint inside that same folder (continuing that run)."""
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"-o {args.out} is an existing file, not a folder")
    found = [name for name in RUN_FILES if os.path.exists(os.path.join(args.out, name))]
    if not found or args.overwrite:
        return
    if args.resume and os.path.samefile(os.path.dirname(os.path.abspath(args.resume)), args.out):
        return
    raise UsageError(f"{args.out} already holds a run ({', '.join(found)}): continue it with "
                     f"--resume {os.path.join(args.out, 'last.pt')}, replace it with --overwrite, "
                     "or choose another -o")


def _optimizer_of(checkpoint):
    """'adam' or 'sgd': from the saved arguments, else from the optimizer state's hyperparameters."""
    saved = checkpoint.get("args", {}).get("optimizer") if isinstance(checkpoint.get("args"), dict) else None
    if saved in ("adam", "sgd"):
        return saved
    groups = checkpoint["optimizer"].get("param_groups") or [{}]
    return "sgd" if "momentum" in groups[0] and "betas" not in groups[0] else "adam"


def _load_resume(args):
    """Reads and checks the --resume checkpoint up front (a dict with model_config, model,
    optimizer, epoch) and settles the optimizer: the checkpoint's; another --optimizer is refused
    (its state does not fit). --lr, when given, replaces the saved learning rate."""
    checkpoint = load_checkpoint(args.resume)
    if not isinstance(checkpoint, dict):
        raise UsageError(f"{args.resume} is not a unet-ext training checkpoint "
                         f"(it holds a {type(checkpoint).__name__}, not a dict)")
    missing = [k for k in ("model_config", "model", "optimizer", "epoch") if k not in checkpoint]
    if missing:
        raise UsageError(f"{args.resume} is not a unet-ext training checkpoint (no {', '.join(missing)})")
    if not isinstance(checkpoint["optimizer"], dict) or type(checkpoint["epoch"]) is not int:
        raise UsageError(f"{args.resume} is not a unet-ext training checkpoint (bad optimizer or epoch)")
    try:
        check_model_config(checkpoint["model_config"])
    except ValueError as error:
        raise UsageError(f"{args.resume}: {error}") from None
    saved = _optimizer_of(checkpoint)
    if args.optimizer is not None and args.optimizer != saved:
        raise UsageError(f"{args.resume} was trained with --optimizer {saved}; resuming with "
                         f"--optimizer {args.optimizer} is not possible (its state does not carry over)")
    args.optimizer = saved
    return checkpoint


def _model_config(args, in_channels):
    return {"in_channels": in_channels, "num_classes": 2, "base_channels": args.base_channels,
            "depth": args.depth, "padding": args.padding, "dropout": args.dropout}


def _check_resume(checkpoint, config, args):
    """The checkpoint's network must be the one asked for: name every difference."""
    saved = checkpoint["model_config"]
    diff = [f"{k}={saved.get(k)!r} (asked {config[k]!r})" for k in MODEL_KEYS
            if saved.get(k) != config[k]]
    if diff:
        raise UsageError(f"{args.resume} was trained with a different model: {', '.join(diff)}")


def _fsync_folder(folder):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(path, payload):
    """torch.save to a temporary file in the same folder, fsync, then an atomic rename and an
    fsync of the folder: a crash or power loss leaves the previous checkpoint or the new one,
    never a truncated file. A failed save (disk full) removes its temporary file and leaves the
    previous checkpoint as it was."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_folder(os.path.dirname(os.path.abspath(path)))


# torch.load(weights_only=True) could still run code before torch 2.6 (CVE-2025-32434).
SAFE_TORCH = (2, 6)


def _check_safe_torch(version=None):
    version = version or torch.__version__
    release = tuple(int(p) for p in version.split("+")[0].split(".")[:2] if p.isdigit())
    if release < SAFE_TORCH:
        raise UsageError(f"loading checkpoints needs torch >= {'.'.join(map(str, SAFE_TORCH))} "
                         f"(torch {version} may run code from a checkpoint file, CVE-2025-32434)")


def remove_stale_temporaries(folder):
    """Deletes checkpoint temporaries (<name>.pt.tmp<pid>) that a killed run left in `folder`:
    those whose process is gone."""
    import glob

    for path in glob.glob(os.path.join(glob.escape(folder), "*.pt.tmp*")):
        pid = path.rsplit(".tmp", 1)[1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            os.unlink(path)
        except PermissionError:  # another user's live process
            pass


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint not found: {path}")
    _check_safe_torch()
    try:
        # weights_only: a pickled payload (code) is refused, never run.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is a usage error here
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise UsageError(f"cannot read checkpoint {path}: {type(error).__name__}: {first_line}") from None


# ---------------------------------------------------------------------------------------------
# Validation


def evaluate(model, val, tile_size, min_size, autocast=None):
    """Overlap-tile prediction of each validation image; scores pooled over the pixels and
    instances of all images (a per-image mean would weight small images like large ones)."""
    from .metrics import instance_f1, instances
    from .tiling import predict_tiled

    inter = union = p_sum = t_sum = 0
    tp = fp = fn = 0
    predictions = []
    for image, labels in val:
        logits = predict_tiled(model, torch.from_numpy(image), tile_size=tile_size,
                               autocast=autocast, progress=False)
        foreground = (logits.argmax(0) == 1).numpy()
        predictions.append(foreground)
        truth = labels > 0
        inter += np.count_nonzero(foreground & truth)
        union += np.count_nonzero(foreground | truth)
        p_sum += np.count_nonzero(foreground)
        t_sum += np.count_nonzero(truth)
        f1 = instance_f1(instances(foreground, min_size), labels)
        tp, fp, fn = tp + f1["tp"], fp + f1["fp"], fn + f1["fn"]
    scores = {"iou": inter / union if union else 1.0,
              "dice": 2 * inter / (p_sum + t_sum) if p_sum + t_sum else 1.0,
              "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0}
    scores = {k: float(v) for k, v in scores.items()}  # plain floats: checkpoints load weights_only
    return scores, predictions


# ---------------------------------------------------------------------------------------------
# Plots


def plot_curves(history, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(epochs, [h["loss"] for h in history], "o-", color="tab:blue", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("weighted cross-entropy", color="tab:blue")
    ax2 = ax.twinx()
    for key, style, colour in (("iou", "s-", "tab:green"), ("f1", "^-", "tab:orange")):
        ax2.plot(epochs, [h[key] for h in history], style, color=colour,
                 label=f"val {'IoU' if key == 'iou' else 'instance F1@0.5'}")
    ax2.set_ylabel("validation score")
    ax2.set_ylim(0, 1)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax2.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="center right")
    ax.set_title("unet-ext train")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_result(image, labels, weights, instances, split_col, path, title):
    """Image, ground truth, weight map, prediction side by side (the README's figure)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def colourise(instances):  # a random colour per instance, black background
        colours = np.random.default_rng(0).uniform(0.25, 1.0, (int(instances.max()) + 1, 3))
        colours[0] = 0
        return colours[instances]

    fig, axes = plt.subplots(1, 4, figsize=(16, 4.6))
    panels = [(image[0], "gray", "image"), (colourise(labels), None, "ground truth (instances)"),
              (weights, "viridis", "weight map w(x), eq. 2"),
              (colourise(instances), None, "prediction (connected components)")]
    for ax, (data, cmap, name) in zip(axes, panels):
        shown = ax.imshow(data, cmap=cmap, interpolation="nearest")
        if name.startswith("weight"):
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
        if split_col is not None:
            ax.axvline(split_col - 0.5, color="red", lw=1, ls="--")
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Training


def _distributed():
    """(rank, world) under torchrun, else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else (0, 1)


def train(args):
    _validate(args)
    _check_out(args)  # before anything is written
    checkpoint = _load_resume(args) if args.resume else None
    lr_given = args.lr is not None
    args.optimizer = args.optimizer or "adam"
    if args.lr is None:
        args.lr = 1e-3 if args.optimizer == "adam" else 1e-2
    rank, world = _distributed()
    device = _device(args.device)
    if args.amp == "fp16" and device.type != "cuda":
        raise UsageError("--amp fp16 needs a CUDA device; use --amp bf16 on the CPU")
    if world == 1:
        return _train(args, checkpoint, lr_given, device, rank, world)
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:  # every way out tears the group down, so no rank is left waiting in a collective
        return _train(args, checkpoint, lr_given, device, rank, world)
    finally:
        dist.destroy_process_group()


def make_loader(dataset, batch_size, sampler=None, workers=0, pin_memory=False):
    """The training DataLoader. Workers are started per epoch, not persistent: a persistent
    worker keeps the dataset copy of its first fork, so SegmentationDataset.set_epoch would
    never reach it and every epoch would replay epoch 0's crops and augmentations."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, shuffle=False, drop_last=True,
        num_workers=workers, persistent_workers=False, pin_memory=pin_memory)


def _train(args, checkpoint, lr_given, device, rank, world):
    from . import UNet
    from .data import SegmentationDataset
    from .ops import weighted_cross_entropy
    from .weight_map import weight_map

    autocast = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    leader = rank == 0
    log = print if leader else (lambda *a, **k: None)

    train_set, val_set, source = _load_data(args)
    config = _model_config(args, train_set[0][0].shape[0])
    torch.manual_seed(args.seed)
    model = UNet(**config).to(device)
    output_size = model.output_size(args.tile_size)
    if args.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.99)
    start_epoch, history, best_iou = 0, [], -1.0
    if checkpoint is not None:
        _check_resume(checkpoint, config, args)
        try:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
        except (KeyError, ValueError, RuntimeError) as error:
            raise UsageError(f"{args.resume}: its weights or optimizer state do not fit its "
                             f"model_config: {str(error).splitlines()[0]}") from None
        if lr_given:  # it replaces the saved rate
            for group in optimizer.param_groups:
                group["lr"] = args.lr
        args.lr = optimizer.param_groups[0]["lr"]
        start_epoch, history = checkpoint["epoch"], checkpoint.get("history", [])
        best_iou = max((h["iou"] for h in history), default=-1.0)
        log(f"resumed from {args.resume} at epoch {start_epoch}")
    scaler = torch.amp.GradScaler(enabled=args.amp == "fp16")

    dataset = SegmentationDataset(
        [i for i, _ in train_set], [l for _, l in train_set], args.tile_size, output_size,
        augment=True, weight_map_kwargs={"w0": args.w0, "sigma": args.sigma},
        epoch_length=args.steps * args.batch_size * world, seed=args.seed)
    sampler = None
    net = model
    if world > 1:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    loader = make_loader(dataset, args.batch_size, sampler, args.workers, device.type == "cuda")

    os.makedirs(args.out, exist_ok=True)
    if leader:
        remove_stale_temporaries(args.out)
    params = sum(p.numel() for p in model.parameters())
    log(f"unet-ext train: {source}; {len(train_set)} image(s), tiles {args.tile_size} -> "
        f"{output_size}, batch {args.batch_size} x {world} process(es), {args.steps} steps/epoch, "
        f"UNet base {args.base_channels} depth {args.depth} {args.padding} ({params:,} params), "
        f"{args.optimizer} lr {args.lr}, amp {args.amp}, device {device}")
    from tqdm.auto import tqdm

    for epoch in range(start_epoch, args.epochs):
        dataset.set_epoch(epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        net.train()
        started = time.perf_counter()
        losses = []
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False,
                   disable=args.no_progress or not leader)
        for image, target, weight in bar:
            image, target, weight = (t.to(device, non_blocking=True) for t in (image, target, weight))
            with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                logits = net(image)
                # Under autocast: a float32 loss read from the 16-bit logits, no float32 copy.
                loss = weighted_cross_entropy(logits, target, weight)
            if not torch.isfinite(loss):
                raise RuntimeError(f"the loss became {loss.item()} at epoch {epoch + 1}; "
                                   "try a lower --lr or --amp bf16")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        train_seconds = time.perf_counter() - started
        if world > 1:  # the epoch's mean loss over all processes
            import torch.distributed as dist

            mean = torch.tensor([float(np.mean(losses))], device=device)
            dist.all_reduce(mean)
            epoch_loss = mean.item() / world
        else:
            epoch_loss = float(np.mean(losses))
        if leader:
            scores, _ = evaluate(model, val_set, args.tile_size, args.min_size, autocast)
            history.append({"epoch": epoch + 1, "loss": epoch_loss, **scores,
                            "seconds": train_seconds,
                            "tiles_per_s": len(losses) * args.batch_size * world / train_seconds})
            log(f"epoch {epoch + 1:3d}/{args.epochs}: loss {epoch_loss:.4f}  val IoU "
                f"{scores['iou']:.3f}  Dice {scores['dice']:.3f}  instance F1@0.5 "
                f"{scores['f1']:.3f}  ({train_seconds:.1f} s, {history[-1]['tiles_per_s']:.1f} tiles/s)")
            payload = {"model_config": config, "model": model.state_dict(),
                       "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                       "history": history, "tile_size": args.tile_size,
                       "args": {k: v for k, v in vars(args).items()
                                if isinstance(v, (int, float, str, bool, type(None)))}}
            save_checkpoint(os.path.join(args.out, "last.pt"), payload)
            if scores["iou"] > best_iou:
                best_iou = scores["iou"]
                save_checkpoint(os.path.join(args.out, "best.pt"), payload)
            plot_curves(history, os.path.join(args.out, "curves.png"))
            history_path = os.path.join(args.out, "history.json")
            with open(history_path + ".tmp", "w") as f:  # never a half-written history
                json.dump(history, f, indent=1)
            os.replace(history_path + ".tmp", history_path)
        if world > 1:
            torch.distributed.barrier()

    if leader and history:
        best_path = os.path.join(args.out, "best.pt")
        if os.path.isfile(best_path):  # the figure shows the checkpoint that predict would use
            model.load_state_dict(load_checkpoint(best_path)["model"])
        _final_figure(model, args, train_set, val_set, source, weight_map, autocast)
        best = max(history, key=lambda h: h["iou"])
        log(f"best val IoU {best['iou']:.3f} (Dice {best['dice']:.3f}, instance F1@0.5 "
            f"{best['f1']:.3f}) at epoch {best['epoch']}; checkpoints, curves.png and result.png "
            f"in {args.out}")
    return 0


def _final_figure(model, args, train_set, val_set, source, weight_map, autocast):
    """The first image whole (train part | validation part), predicted by overlap-tile with the
    best checkpoint's weights."""
    from .tiling import predict_tiled

    image = np.concatenate([train_set[0][0], val_set[0][0]], axis=-1)
    labels = np.concatenate([train_set[0][1], val_set[0][1]], axis=-1)
    logits = predict_tiled(model, torch.from_numpy(image), tile_size=args.tile_size,
                           autocast=autocast, progress=False)
    foreground = (logits.argmax(0) == 1).numpy()
    from .metrics import instances

    weights = weight_map(labels, w0=args.w0, sigma=args.sigma)
    plot_result(image, labels, weights, instances(foreground, args.min_size),
                train_set[0][0].shape[-1], os.path.join(args.out, "result.png"),
                f"{source}: left of the dashed line trained on, right held out")

