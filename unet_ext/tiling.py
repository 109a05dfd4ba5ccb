"""Overlap-tile prediction (Ronneberger et al., 2015, Fig. 2) of images of any size with a U-Net,
in bounded memory: the image is mirror-extended, cut into tiles that go to the model's device a
batch at a time, and the logits are stitched on the CPU. With padding="valid" the result equals
the whole image predicted at once; with padding="same" overlapping tiles are blended.
"""
import contextlib

import numpy as np
import torch

from ._unet_shape import check_input_size

__all__ = ["predict_tiled"]


def _reflect_index(start, length, size):
    """Indices into range(size) of positions start .. start+length-1 of the image mirror-extended
    without repeating the edge (numpy's "reflect"), reflecting as often as needed, so margins
    wider than the image (which F.pad's reflect refuses) work too."""
    i = torch.arange(start, start + length)
    if size == 1:
        return torch.zeros_like(i)
    period = 2 * (size - 1)
    i = i.remainder(period)
    return torch.where(i < size, i, period - i)


def _window(size, floor=1e-3, dtype=torch.float32):
    """Hann window on (0, size), kept >= floor so pixels that only a tile's border covers still
    get a positive weight sum."""
    hann = torch.sin(torch.pi * (torch.arange(size, dtype=torch.float64) + 0.5) / size) ** 2
    return (floor + (1 - floor) * hann).to(dtype)


def _as_image(image, model):
    """(N, C, H, W) floating tensor and whether a batch dim was added."""
    if isinstance(image, np.ndarray):
        if not np.isrealobj(image) or image.dtype == object:
            raise ValueError(f"image must hold real numbers, got numpy dtype {image.dtype}")
        image = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    elif not isinstance(image, torch.Tensor):
        raise ValueError(f"image must be a torch.Tensor or numpy.ndarray, got {type(image).__name__}")
    if image.is_complex():
        raise ValueError(f"image must hold real numbers, got {image.dtype}")
    if image.dim() not in (2, 3, 4):
        raise ValueError(f"image must be (N, C, H, W), (C, H, W) or (H, W), got shape "
                         f"{tuple(image.shape)}")
    batched = image.dim() == 4
    while image.dim() < 4:
        image = image.unsqueeze(0)
    if image.shape[1] != model.in_channels:
        raise ValueError(f"image has {image.shape[1]} channels but the model expects "
                         f"{model.in_channels} (shape {tuple(image.shape)})")
    if image.shape[-2] == 0 or image.shape[-1] == 0:
        raise ValueError(f"image is empty (H, W = {tuple(image.shape[-2:])})")
    return image, batched


def _layout_valid(model, tile_size, overlap):
    """Tile starts are multiples of the stride and the stride a multiple of 2**depth: every
    tile's pooling grid is then the whole image's, so overlapping outputs agree and the
    stitched result is the whole image's prediction (the paper's seamless tiling)."""
    if overlap is not None:
        raise ValueError("overlap applies to padding='same' only: valid tiles overlap by the "
                         "network's margin")
    check_input_size(tile_size, model.depth, model.padding)
    out = model.output_size(tile_size)
    stride = out - out % 2 ** model.depth
    if stride == 0:
        raise ValueError(f"tile_size={tile_size} gives {out}x{out} output tiles, smaller than "
                         f"2**depth = {2 ** model.depth}: use a larger tile_size")
    margin = (tile_size - out) // 2
    return margin, stride, out


def _layout_same(model, tile_size, overlap):
    step = 2 ** model.depth
    if tile_size % step or tile_size < step:
        raise ValueError(f"tile_size must be a positive multiple of 2**depth = {step} with "
                         f"padding='same', got {tile_size}")
    if overlap is None:
        # About a quarter of the tile, and a multiple of 2**depth so tiles stay on one pooling grid.
        overlap = min(round(tile_size / 4 / step) * step, tile_size - step)
    if not isinstance(overlap, int) or not 0 <= overlap < tile_size:
        raise ValueError(f"overlap must be an int in [0, tile_size={tile_size}), got {overlap!r}")
    # Mirror-extend by half the overlap so the image's border is not a tile's (zero-padded) border.
    return overlap // 2, tile_size - overlap, tile_size


def predict_tiled(model, image, tile_size=572, batch_size=4, overlap=None, autocast=None,
                  progress=None, device=None, window_floor=1e-3):
    """Logits of `model` (unet_ext.UNet or unet_ext.reference.UNet) for `image`, predicted tile by
    tile (the paper's overlap-tile strategy).

    image: (N, C, H, W), (C, H, W) or (H, W) tensor or numpy array of any real dtype and size.
        It is converted to float32 (float64 if the model's parameters are float64); each tile is
        cast to the parameters' dtype on the device.
    tile_size: the model's input tile. padding="valid": a valid input size (572 for the paper's
        net: 388x388 outputs, a 92-pixel mirrored margin; tiles step by the largest multiple of
        2**depth that fits the output, and the result equals the whole image predicted at
        once). padding="same": a multiple of 2**depth; tiles overlap and are blended.
    batch_size: tiles per forward pass (only one batch of tiles is on the device at a time).
    overlap: padding="same" only: pixels shared by neighbouring tiles (default about
        tile_size // 4, a multiple of 2**depth); the image is mirror-extended by overlap // 2.
        Overlaps are blended with a separable Hann window of floor `window_floor`.
    autocast: a dtype (e.g. torch.bfloat16) to run the model under torch.autocast; None: off.
    progress: a tqdm bar over tiles: True, False, or None (shown for more than 16 tiles).
    device: where the tiles run (default: the device of the model's parameters).

    Returns the logits (N, num_classes, H, W) on the CPU, float32 (float64 for a float64 model);
    (num_classes, H, W) if the image had no batch dim. The model runs in eval mode under
    torch.inference_mode(); its training flag is restored afterwards.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 1:
        raise ValueError(f"tile_size must be a positive int, got {tile_size!r}")
    if autocast is not None and not isinstance(autocast, torch.dtype):
        raise ValueError(f"autocast must be a torch.dtype or None, got {autocast!r}")
    if not 0 < window_floor <= 1:
        raise ValueError(f"window_floor must be in (0, 1], got {window_floor!r}")
    parameter = next(model.parameters(), None)
    param_dtype = parameter.dtype if parameter is not None else torch.float32
    if device is None:
        device = parameter.device if parameter is not None else torch.device("cpu")
    device = torch.device(device)
    out_dtype = torch.float64 if param_dtype == torch.float64 else torch.float32

    image, batched = _as_image(image, model)
    image = image.to(device="cpu", dtype=out_dtype)
    n, _, height, width = image.shape
    same = model.padding == "same"
    layout = _layout_same if same else _layout_valid
    margin, stride, out = layout(model, tile_size, overlap)

    def starts(size):
        # Output tile k covers image rows [k * stride - lead, ... + out): valid tiles start at the
        # image's origin (their input at -margin); same tiles start at -margin (the mirror band).
        lead = margin if same else 0
        count = max(1, -(-(size + 2 * lead - out) // stride) + 1)
        return [k * stride - lead for k in range(count)]

    rows, cols = starts(height), starts(width)
    tiles = [(b, y, x) for b in range(n) for y in rows for x in cols]
    # Where each output tile's input begins relative to its output (the valid network's margin).
    shift = 0 if same else margin

    logits = torch.zeros(n, model.num_classes, height, width, dtype=out_dtype)
    if same:
        window = _window(tile_size, window_floor, out_dtype)
        window = window[:, None] * window[None, :]
        weight_sum = torch.zeros(height, width, dtype=out_dtype)
        for y in rows:
            for x in cols:
                (ya, yb, ty), (xa, xb, tx) = _clip(y, out, height), _clip(x, out, width)
                weight_sum[ya:yb, xa:xb] += window[ty:ty + yb - ya, tx:tx + xb - xa]

    show = progress if progress is not None else len(tiles) > 16
    bar = None
    if show:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(tiles), desc="tiles", unit="tile", leave=False)
    amp = (torch.autocast(device.type, dtype=autocast) if autocast is not None
           else contextlib.nullcontext())
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), amp:
            for first in range(0, len(tiles), batch_size):
                chunk = tiles[first:first + batch_size]
                batch = torch.stack([
                    image[b][:, _reflect_index(y - shift, tile_size, height)[:, None],
                             _reflect_index(x - shift, tile_size, width)[None, :]]
                    for b, y, x in chunk])
                pred = model(batch.to(device=device, dtype=param_dtype))
                pred = pred.to(device="cpu", dtype=out_dtype)
                for (b, y, x), tile in zip(chunk, pred):
                    (ya, yb, ty), (xa, xb, tx) = _clip(y, out, height), _clip(x, out, width)
                    tile = tile[:, ty:ty + yb - ya, tx:tx + xb - xa]
                    if same:
                        logits[b, :, ya:yb, xa:xb] += tile * window[ty:ty + yb - ya,
                                                                    tx:tx + xb - xa]
                    else:
                        # Overlapping valid outputs are identical: the later tile just overwrites.
                        logits[b, :, ya:yb, xa:xb] = tile
                if bar is not None:
                    bar.update(len(chunk))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    if same:
        logits /= weight_sum
    return logits if batched else logits[0]


def _clip(start, length, size):
    """The part of [start, start + length) inside [0, size): (begin, end, offset into the tile)."""
    begin, end = max(start, 0), min(start + length, size)
    return begin, end, begin - start
