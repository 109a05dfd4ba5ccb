"""`unet-ext predict CKPT IMAGE... -o OUT`: overlap-tile segmentation of images of any size with a
checkpoint from `unet-ext train` (it carries the model config, so nothing else is needed).
Per image it writes the class map (<stem>_seg), optionally the foreground probability
(<stem>_prob, float32 TIFF) and instance labels from connected components (<stem>_instances);
with --labels it scores the result (foreground IoU, Dice, instance F1 at IoU 0.5).
Before anything is written, inputs whose outputs would collide, an output that would replace an
input, and (without --overwrite) existing outputs are refused.
"""
import os

import numpy as np
import torch

from ._cli import Parser, UsageError, run
from .data import MASK_SUFFIXES
from ._unet_shape import check_input_size, check_model_config, output_size, valid_input_size

__all__ = ["main", "build_parser", "load_model", "default_tile_size"]


def build_parser(prog="unet-ext predict"):
    p = Parser(prog=prog, description=__doc__.split("\n")[0].strip("`"))
    p.add_argument("checkpoint", help="a checkpoint written by `unet-ext train`")
    p.add_argument("images", nargs="+", help="TIFF or PNG images (2-D, or with a channel axis)")
    p.add_argument("-o", "--out", required=True,
                   help="output folder; outputs are <stem>_seg, <stem>_prob, <stem>_instances")
    p.add_argument("--overwrite", action="store_true",
                   help="replace outputs that already exist (never an input)")
    p.add_argument("--labels", nargs="+", default=None,
                   help="ground-truth instance masks, one per image, to score the prediction")
    p.add_argument("--tile-size", type=int, default=None,
                   help="input tile size (default: fits the image, at most 572)")
    p.add_argument("--batch-size", type=int, default=4, help="tiles per forward pass")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--amp", choices=("off", "bf16", "fp16"), default="off", help="autocast dtype")
    p.add_argument("--format", choices=("tif", "png"), default="tif",
                   help="format of the class map and instance labels")
    p.add_argument("--prob", action="store_true", help="also write the foreground probability")
    p.add_argument("--instances", action="store_true",
                   help="also write instance labels (connected components of the foreground)")
    p.add_argument("--min-size", type=int, default=15,
                   help="drop instances smaller than this (pixels)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv=None, prog="unet-ext predict"):
    args = build_parser(prog).parse_args(argv)
    return run(prog, predict, args)


def load_model(path, device="cpu"):
    """The UNet of a `unet-ext train` checkpoint, in eval mode, and the checkpoint."""
    from . import UNet
    from .train import MODEL_KEYS, load_checkpoint

    checkpoint = load_checkpoint(path)
    config = checkpoint.get("model_config") if isinstance(checkpoint, dict) else None
    if not isinstance(config, dict) or not isinstance(checkpoint.get("model"), dict):
        raise UsageError(f"{path} is not a unet-ext training checkpoint (no model_config)")
    try:
        check_model_config(config)  # before building: a hostile config must not allocate terabytes
    except ValueError as error:
        raise UsageError(f"{path}: {error}") from None
    model = UNet(**{k: config[k] for k in MODEL_KEYS})
    try:
        model.load_state_dict(checkpoint["model"])
    except (KeyError, RuntimeError) as error:
        raise UsageError(f"{path}: weights do not match its model_config: "
                         f"{str(error).splitlines()[0]}") from None
    return model.to(device).eval(), checkpoint


def default_tile_size(model, height, width):
    """The smallest tile that covers the image (plus the valid-mode margin), at most the paper's
    572 (larger tiles save little and cost memory)."""
    cap = valid_input_size(572, model.depth, model.padding)
    if model.padding == "same":
        step = 2 ** model.depth
        return min(cap, -(-max(height, width, step) // step) * step)
    margin = cap - output_size(cap, model.depth, "valid")
    return valid_input_size(min(max(height, width) + margin, cap), model.depth, "valid")


def output_names(args):
    """{input path: [output file names]} for every image, in the order they are written."""
    names = {}
    for path in args.images:
        stem = os.path.splitext(os.path.basename(path))[0]
        names[path] = ([f"{stem}_seg.{args.format}"] + ([f"{stem}_prob.tif"] if args.prob else [])
                       + ([f"{stem}_instances.{args.format}"] if args.instances else []))
    return names


def _check_outputs(args):
    """Before anything is written: no two inputs may share an output file (outputs are named by
    the stem: a/img.tif and b/img.tif, or img.png and img.tif), no output may be an input or a
    mask (x_seg.tif among the inputs of x.tif with -o their folder), and an existing output is
    replaced only with --overwrite."""
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"-o {args.out} is an existing file, not a folder")
    inputs = {os.path.realpath(p): p for p in args.images + (args.labels or [])}
    owner = {}
    for path, names in output_names(args).items():
        for name in names:
            target = os.path.realpath(os.path.join(args.out, name))
            if target in owner and owner[target] != path:
                raise UsageError(f"{owner[target]} and {path} would both be written to "
                                 f"{os.path.join(args.out, name)} (outputs are named by the file "
                                 "stem): rename one, or predict them into separate -o folders")
            if target in owner:
                raise UsageError(f"{path} is given twice")
            if target in inputs:
                raise UsageError(f"the output {os.path.join(args.out, name)} of {path} would replace "
                                 f"the input {inputs[target]}: choose another -o")
            owner[target] = path
    existing = [t for t in owner if os.path.exists(t)]
    if existing and not args.overwrite:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise UsageError(f"{existing[0]}{more} already exist(s): pass --overwrite to replace, or "
                         "choose another -o")


def predict(args):
    from .data import normalize, read_image, read_labels, write_image
    from .metrics import dice, foreground_iou, instance_f1, instances
    from .tiling import predict_tiled
    from .train import _device

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.labels is not None and len(args.labels) != len(args.images):
        raise UsageError(f"--labels takes one mask per image: {len(args.images)} image(s), "
                         f"{len(args.labels)} mask(s)")
    for path in args.images + (args.labels or []):
        if not os.path.isfile(path):
            raise UsageError(f"file not found: {path}")
    for path in args.labels or []:
        if os.path.splitext(path)[1].lower() not in MASK_SUFFIXES:
            raise UsageError(f"--labels {path}: masks must be lossless ({', '.join(MASK_SUFFIXES)}); "
                             "a lossy format such as JPEG changes label values")
    _check_outputs(args)
    device = _device(args.device)
    if args.amp == "fp16" and device.type != "cuda":
        raise UsageError("--amp fp16 needs a CUDA device; use --amp bf16 on the CPU")
    autocast = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    model, _ = load_model(args.checkpoint, device)
    if args.tile_size is not None:
        try:
            check_input_size(args.tile_size, model.depth, model.padding)
        except ValueError as error:
            raise UsageError(f"--tile-size: {error}") from None
        if model.padding == "same" and args.tile_size % 2 ** model.depth:
            raise UsageError(f"--tile-size must be a multiple of {2 ** model.depth} for this "
                             "same-padding model")
    os.makedirs(args.out, exist_ok=True)

    for index, path in enumerate(args.images):
        try:
            image = normalize(read_image(path))
        except ValueError as error:
            raise UsageError(f"cannot read {path}: {error}") from None
        if image.shape[0] != model.in_channels:
            raise UsageError(f"{path} has {image.shape[0]} channel(s); the model takes "
                             f"{model.in_channels}")
        height, width = image.shape[-2:]
        tile = args.tile_size or default_tile_size(model, height, width)
        logits = predict_tiled(model, torch.from_numpy(image), tile_size=tile,
                               batch_size=args.batch_size, autocast=autocast,
                               progress=False if args.no_progress else None)
        truth = None
        if args.labels is not None:  # read (and checked) before this image's outputs are written
            try:
                truth = read_labels(args.labels[index])
            except ValueError as error:
                raise UsageError(f"--labels {args.labels[index]}: {error}") from None
            if truth.shape != (height, width):
                raise UsageError(f"mask {args.labels[index]} is {truth.shape}, image {path} is "
                                 f"{(height, width)}")
        classes = logits.argmax(0).numpy().astype(np.uint8)
        stem = os.path.splitext(os.path.basename(path))[0]
        write_image(os.path.join(args.out, f"{stem}_seg.{args.format}"), classes)
        written = [f"{stem}_seg.{args.format}"]
        if args.prob:
            prob = torch.softmax(logits.float(), 0)[1].numpy()
            write_image(os.path.join(args.out, f"{stem}_prob.tif"), prob.astype(np.float32))
            written.append(f"{stem}_prob.tif")
        labels_pred = instances(classes == 1, args.min_size)
        if args.instances:
            dtype = np.uint16 if labels_pred.max() < 2 ** 16 else np.uint32
            if args.format == "png" and dtype != np.uint16:
                raise UsageError(f"{path}: {labels_pred.max()} instances do not fit a 16-bit PNG; "
                                 "use --format tif")
            write_image(os.path.join(args.out, f"{stem}_instances.{args.format}"),
                        labels_pred.astype(dtype))
            written.append(f"{stem}_instances.{args.format}")
        line = (f"{path}: {height}x{width}, tile {tile}, {int(labels_pred.max())} instances -> "
                f"{', '.join(written)}")
        if truth is not None:
            f1 = instance_f1(labels_pred, truth)
            line += (f"; IoU {foreground_iou(classes, truth):.3f}, Dice {dice(classes, truth):.3f}, "
                     f"instance F1@0.5 {f1['f1']:.3f} ({f1['tp']} TP, {f1['fp']} FP, {f1['fn']} FN)")
        print(line)
    return 0
