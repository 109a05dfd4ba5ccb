"""Training data for the U-Net: image I/O, the example nuclei image shipped by `stardist`,
per-image normalisation, the paper's elastic deformation, and a Dataset of random
overlap-tile crops (mirrored borders) with flips, 90-degree rotations, gray-value changes and
elastic deformation, each item returning (image tile, 0/1 target, eq. 2 weight map).

Conventions: images are (C, H, W) float32 (C = 1 for gray), labels are (H, W) integer
instance labels with 0 = background.
"""
import functools
import importlib.util
import math
import site
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

__all__ = [
    "nuclei_files", "load_nuclei", "read_image", "read_labels", "write_image", "load_folder", "normalize",
    "displacement_field", "elastic_deform", "SegmentationDataset", "split_image",
]

TIFF_SUFFIXES = (".tif", ".tiff")
PILLOW_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGE_SUFFIXES = TIFF_SUFFIXES + PILLOW_SUFFIXES
# Label masks must be lossless: JPEG's artefacts turn into spurious tiny instances.
MASK_SUFFIXES = TIFF_SUFFIXES + (".png",)


# --------------------------------------------------------------------------------------------
# Example data


def nuclei_files():
    """(image_path, mask_path) of the 512x512 fluorescence nuclei image and its instance mask
    (2018 Data Science Bowl, Caicedo et al. 2019, BSD-3) shipped in the `stardist` wheel as
    ``stardist/data/images/img2d.tif`` and ``mask2d.tif``.

    stardist is located without being imported (importing it pulls in TensorFlow/csbdeep,
    which a ``--no-deps`` install lacks).
    """
    candidates = []
    try:
        spec = importlib.util.find_spec("stardist")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) for p in spec.submodule_search_locations]
    roots = list(sys.path)
    try:
        roots += site.getsitepackages() + [site.getusersitepackages()]
    except AttributeError:  # some virtualenvs ship a site module without these
        pass
    candidates += [Path(r or ".") / "stardist" for r in roots]
    for folder in candidates:
        images = folder / "data" / "images"
        image, mask = images / "img2d.tif", images / "mask2d.tif"
        if image.is_file() and mask.is_file():
            return str(image), str(mask)
    raise FileNotFoundError(
        "the example nuclei image (stardist/data/images/img2d.tif and mask2d.tif) was not found; "
        "it ships with the stardist wheel: `pip install --no-deps stardist`")


def load_nuclei():
    """The nuclei example as (image float32 (512, 512) in raw intensities, labels int32 (512, 512)).

    Normalise the image with :func:`normalize` before training.
    """
    image_path, mask_path = nuclei_files()
    return read_image(image_path).astype(np.float32), _as_labels(read_image(mask_path), mask_path)


# --------------------------------------------------------------------------------------------
# Image files


def read_image(path):
    """Read a .tif/.tiff (tifffile) or .png/.jpg/.jpeg (Pillow) file into a numpy array.

    Arrays come back as stored: (H, W) gray, (H, W, 3|4) RGB(A) for Pillow files, any layout
    for TIFF; palette PNGs give their indices (what label masks saved as palette images need).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise ValueError(f"cannot read {path}: unsupported file type {suffix!r} "
                         f"(supported: {', '.join(IMAGE_SUFFIXES)})")
    try:
        if suffix in TIFF_SUFFIXES:
            import tifffile
            return np.asarray(tifffile.imread(path))
        from PIL import Image
        with Image.open(path) as image:
            return np.array(image)
    except Exception as error:  # a corrupt file may raise about anything; say which file
        raise ValueError(f"cannot read image file {path}: {error}") from error


def read_labels(path):
    """An instance mask (H, W) as int32 (int64 if needed): a lossless file (.tif, .tiff, .png)
    holding non-negative integers. Lossy formats (JPEG) are refused with ValueError."""
    if Path(path).suffix.lower() not in MASK_SUFFIXES:
        raise ValueError(f"mask {path}: masks must be lossless ({', '.join(MASK_SUFFIXES)}); a lossy "
                         "format such as JPEG adds spurious label values")
    return _as_labels(read_image(path), path)


def check_finite(image, path):
    """Raises ValueError naming `path` if the image holds NaN or inf pixels: one of them would make
    the whole normalised image NaN (its percentiles are NaN)."""
    image = np.asarray(image)
    if np.issubdtype(image.dtype, np.inexact):
        bad = image.size - np.count_nonzero(np.isfinite(image))
        if bad:
            raise ValueError(f"image {path} holds {bad} non-finite pixel(s) (NaN or inf); "
                             "replace them (e.g. with the image's minimum) before use")


def write_image(path, array):
    """Write a numpy array to .tif/.tiff (any dtype, tifffile) or .png (Pillow: uint8 (H, W),
    (H, W, 3) or (H, W, 4), or uint16 (H, W))."""
    path = Path(path)
    array = np.asarray(array)
    suffix = path.suffix.lower()
    if suffix in TIFF_SUFFIXES:
        import tifffile
        tifffile.imwrite(path, array)
        return
    if suffix != ".png":
        # JPEG is lossy, which would silently corrupt label masks.
        raise ValueError(f"cannot write {path}: only .tif, .tiff and .png are supported")
    if array.dtype == np.uint8 and (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        pass
    elif array.dtype == np.uint16 and array.ndim == 2:
        pass
    else:
        raise ValueError(f"cannot write {path}: PNG needs uint8 (H, W), (H, W, 3), (H, W, 4) or "
                         f"uint16 (H, W), got {array.dtype} {array.shape} (use .tif instead)")
    from PIL import Image
    Image.fromarray(np.ascontiguousarray(array)).save(path)


def load_folder(folder):
    """Image/mask pairs of a dataset folder laid out as::

        folder/images/<name>.<tif|tiff|png|jpg|jpeg>
        folder/masks/<name>.<tif|tiff|png>      (instance labels, 0 = background)

    An image and its mask share the file stem ``<name>`` (the suffixes may differ); files with
    other suffixes and hidden files are ignored. Returns ``(images, masks, names)``: lists sorted
    by name, images as read (see :func:`read_image`; normalise them with :func:`normalize`),
    masks as int32 (int64 if needed) (H, W) arrays.

    Raises FileNotFoundError if a folder or an image's mask is missing, ValueError if a mask has
    no image, two files share a stem, a mask is in a lossy format (JPEG), an image holds NaN or
    inf pixels, or a mask's (H, W) differs from its image's.
    """
    folder = Path(folder)
    images = _files_by_stem(folder / "images")
    masks = _files_by_stem(folder / "masks")
    lossy = [str(path) for path in masks.values() if path.suffix.lower() not in MASK_SUFFIXES]
    if lossy:
        raise ValueError(f"masks must be lossless ({', '.join(MASK_SUFFIXES)}); a lossy format such "
                         f"as JPEG adds spurious label values: {', '.join(lossy)}")
    orphans = sorted(set(masks) - set(images))
    if orphans:
        raise ValueError(f"masks without an image in {folder / 'images'}: "
                         + ", ".join(str(masks[s]) for s in orphans))
    out_images, out_masks, names = [], [], []
    for stem in sorted(images):
        if stem not in masks:
            raise FileNotFoundError(f"no mask for image {images[stem]}: expected "
                                    f"{folder / 'masks' / stem}.<tif|tiff|png>")
        image = read_image(images[stem])
        check_finite(image, images[stem])
        mask = read_image(masks[stem])
        hw = _to_chw(image).shape[1:]
        if mask.ndim != 2 or mask.shape != hw:
            raise ValueError(f"mask {masks[stem]} has shape {mask.shape} but image {images[stem]} "
                             f"has shape {image.shape} (spatial size {hw})")
        out_images.append(image)
        out_masks.append(_as_labels(mask, masks[stem]))
        names.append(stem)
    return out_images, out_masks, names


def _files_by_stem(folder):
    if not folder.is_dir():
        raise FileNotFoundError(f"folder not found: {folder}")
    files = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if path.stem in files:
            raise ValueError(f"two files with the stem {path.stem!r}: {files[path.stem]} and {path}")
        files[path.stem] = path
    return files


def _as_labels(mask, path):
    if mask.ndim != 2:
        raise ValueError(f"mask {path} must be a 2-D label image, got shape {mask.shape}")
    if not np.issubdtype(mask.dtype, np.integer):
        if not np.array_equal(mask, np.round(mask)):
            raise ValueError(f"mask {path} holds non-integer values (dtype {mask.dtype})")
    if mask.size and mask.min() < 0:
        raise ValueError(f"mask {path} holds negative labels")
    big = mask.size and mask.max() > np.iinfo(np.int32).max
    return mask.astype(np.int64 if big else np.int32)


# --------------------------------------------------------------------------------------------
# Normalisation


def _to_chw(image):
    """(H, W) -> (1, H, W); a 3-D array is (H, W, C) when its last axis has <= 4 entries and its
    first more than 4 (RGB(A) files), otherwise (C, H, W)."""
    image = np.asarray(image)
    if image.ndim == 2:
        return image[None]
    if image.ndim == 3:
        if image.shape[-1] <= 4 < image.shape[0]:
            return np.moveaxis(image, -1, 0)
        return image
    raise ValueError(f"image must be (H, W), (C, H, W) or (H, W, C), got shape {image.shape}")


def normalize(image, low=1.0, high=99.8, clip=True):
    """Per-image, per-channel percentile normalisation: the `low` percentile maps to 0 and the
    `high` one to 1 (clipped to [0, 1] unless ``clip=False``).

    Takes (H, W), (C, H, W) or (H, W, C) (see the layout rule in ``_to_chw``: a trailing axis of
    <= 4 entries after a longer first one is channels) and returns (C, H, W) float32, C = 1 for
    gray. A constant channel becomes 0. Raises ValueError if a pixel is NaN or inf (it would make
    every pixel NaN).
    """
    image = _to_chw(image).astype(np.float32)
    if not np.isfinite(image).all():
        raise ValueError(f"the image holds {image.size - np.count_nonzero(np.isfinite(image))} "
                         "non-finite pixel(s) (NaN or inf; or values beyond float32)")
    lo, hi = np.percentile(image, [low, high], axis=(1, 2), keepdims=True).astype(np.float32)
    scale = hi - lo
    out = (image - lo) / np.where(scale > 0, scale, 1)
    if clip:
        np.clip(out, 0, 1, out=out)
    return out


# --------------------------------------------------------------------------------------------
# Elastic deformation


@functools.lru_cache(maxsize=32)
def _cubic_basis(size, grid):
    """(size, grid) matrix B with B @ values = the cubic spline through `grid` equally spaced
    nodes (the first at pixel 0, the last at pixel size - 1) evaluated at every pixel.

    Spline interpolation is linear in the node values, so interpolating the unit vectors gives
    the basis; the 2-D bicubic field is then B_y @ nodes @ B_x.T (separable, a few matmuls).
    """
    position = np.linspace(0, grid - 1, size) if size > 1 else np.zeros(1)
    basis = np.stack([ndimage.map_coordinates(np.eye(grid)[k], position[None], order=3,
                                              mode="mirror") for k in range(grid)], axis=1)
    basis.flags.writeable = False
    return basis


def displacement_field(shape, rng, grid=3, std=10.0):
    """A smooth random displacement field (2, H, W) in pixels (dy, dx): vectors drawn from
    N(0, std) on a grid x grid grid spanning the image corner to corner, bicubically
    interpolated to every pixel (the U-Net paper's elastic deformation)."""
    if grid < 2:
        raise ValueError(f"grid must be >= 2, got {grid}")
    height, width = shape
    nodes = rng.normal(0.0, std, size=(2, grid, grid))
    by, bx = _cubic_basis(height, grid), _cubic_basis(width, grid)
    # by @ nodes @ bx.T as a sum of `grid` outer products: BLAS would thread these skinny
    # products, which costs far more than it saves (and oversubscribes DataLoader workers).
    rows = np.einsum("hj,cjk->chk", by, nodes)  # (2, H, grid), small
    field = np.zeros((2, height, width))
    for k in range(grid):
        field += rows[:, :, k, None] * bx[None, None, :, k]
    return field


def _warp(array, coords, order):
    """Sample `array` ((H, W) or (C, H, W)) at `coords` (2, h, w), mirroring outside."""
    if array.ndim == 2:
        return ndimage.map_coordinates(array, coords, order=order, mode="reflect")
    return np.stack([ndimage.map_coordinates(channel, coords, order=order, mode="reflect")
                     for channel in array])


def elastic_deform(image, labels, rng, grid=3, std=10.0):
    """The U-Net paper's elastic deformation of image (C, H, W) float32 and labels (H, W) int
    with one random field (:func:`displacement_field`): the image resampled with cubic splines,
    the labels with nearest neighbour (so no new label values); both mirror outside.

    ``std=0`` is the identity (up to float rounding of the image).
    """
    image = np.asarray(image, dtype=np.float32)
    labels = np.asarray(labels)
    if image.ndim != 3 or image.shape[1:] != labels.shape:
        raise ValueError(f"need image (C, H, W) and labels (H, W), got {image.shape} and {labels.shape}")
    field = displacement_field(labels.shape, rng, grid, std)
    coords = np.indices(labels.shape, dtype=np.float64) + field
    return _warp(image, coords, order=3), _warp(labels, coords, order=0)


# --------------------------------------------------------------------------------------------
# Dataset


def _reflect_index(index, size):
    """Indices into [0, size) mirrored like np.pad(mode="symmetric") (edge pixel repeated),
    repeated as often as needed."""
    index = np.mod(index, 2 * size)
    return np.where(index >= size, 2 * size - 1 - index, index)


def _tile_starts(size, output):
    """Top-left corners of output windows covering [0, size): a regular grid, the last window
    shifted back inside; one centred window if the image is smaller than the window."""
    if size <= output:
        return [-((output - size) // 2)]
    return list(range(0, size - output, output)) + [size - output]


class SegmentationDataset(torch.utils.data.Dataset):
    """Overlap-tile training crops with the U-Net paper's augmentation.

    Args:
        images: one image or a list; each (C, H, W) (or (H, W)) float32, already normalised.
        labels: matching (H, W) integer instance labels (0 = background).
        tile_size: input tile side. output_size: output window side; ``output_size < tile_size``
            for valid convolutions, ``==`` for same padding; their difference must be even.
        augment: random crops and augmentation (training). ``False``: a fixed tiling of each
            image in reading order (validation); ``self.tiles[i] = (image, y0, x0)`` gives the
            output window's top-left corner of item i (negative if the image is smaller).
        weight_map_kwargs: keyword arguments of :func:`unet_ext.weight_map.weight_map`
            (e.g. ``w0``, ``sigma``); the maps are computed once per mask, on the whole mask.
        epoch_length: random crops per epoch (augment=True only); default: the number of tiles
            that cover every image once.
        seed: with the epoch (:meth:`set_epoch`) and the index, fixes every random draw.
        flips, rotations, gray_value, elastic: which augmentations to apply.
        elastic_grid, elastic_std: the deformation's grid size and displacement std (pixels).

    Item: ``(image (C, tile, tile) float32, target (out, out) int64 in {0, 1},
    weight (out, out) float32)``. The output window lies inside the image (centred if the
    image is smaller); the input tile is centred on it and everything outside the image is
    mirrored (np.pad mode="symmetric", repeated if needed), for image, labels and weights alike.

    Augmentation, one draw per item from ``np.random.default_rng([seed, epoch, index])``:
    horizontal flip, rotation by k*90 degrees, elastic deformation (applied to image, labels and
    weights with the same field; image cubic, labels and weights nearest neighbour, so each
    output pixel takes its label and weight from the same source pixel; content pulled in from
    outside the tile comes from the image, not from a mirror of the tile), then a gray-value
    change of the image only: ``x -> c * x + b`` with c ~ U(0.8, 1.2), b ~ U(-0.1, 0.1), then
    ``x -> sign(x) |x|**g`` with g log-uniform in [0.7, 1.4].

    Item i of epoch e depends only on (seed, e, i), so DataLoader workers and DDP ranks (which
    take distinct indices) get deterministic, distinct crops. Call ``set_epoch(e)`` before each
    epoch; the workers see it if they are started per epoch (``persistent_workers=False``, the
    default).
    """

    def __init__(self, images, labels, tile_size, output_size, *, augment=True,
                 weight_map_kwargs=None, epoch_length=None, seed=0, flips=True, rotations=True,
                 gray_value=True, elastic=True, elastic_grid=3, elastic_std=10.0):
        from .weight_map import weight_map

        if isinstance(images, np.ndarray) or torch.is_tensor(images):
            images, labels = [images], [labels]
        if len(images) != len(labels) or not images:
            raise ValueError(f"need as many label images as images (and at least one), "
                             f"got {len(images)} and {len(labels)}")
        tile_size, output_size = int(tile_size), int(output_size)
        if not 0 < output_size <= tile_size or (tile_size - output_size) % 2:
            raise ValueError(f"need 0 < output_size <= tile_size with an even difference, "
                             f"got tile_size={tile_size}, output_size={output_size}")
        self.images, self.labels = [], []
        for k, (image, label) in enumerate(zip(images, labels)):
            image = np.asarray(image, dtype=np.float32)
            image = image[None] if image.ndim == 2 else image
            label = np.asarray(label)
            if image.ndim != 3 or label.shape != image.shape[1:]:
                raise ValueError(f"image {k}: need image (C, H, W) and labels (H, W), "
                                 f"got {image.shape} and {label.shape}")
            self.images.append(image)
            self.labels.append(label)
        if len({image.shape[0] for image in self.images}) > 1:
            raise ValueError("all images need the same number of channels")
        self.weight_map_kwargs = dict(weight_map_kwargs or {})
        self.weights = [np.asarray(weight_map(label, **self.weight_map_kwargs), dtype=np.float32)
                        for label in self.labels]
        self.tile_size, self.output_size = tile_size, output_size
        self.margin = (tile_size - output_size) // 2
        self.augment = augment
        self.tiles = [(k, y0, x0) for k, label in enumerate(self.labels)
                      for y0 in _tile_starts(label.shape[0], output_size)
                      for x0 in _tile_starts(label.shape[1], output_size)]
        if not augment and epoch_length is not None:
            raise ValueError("epoch_length applies to augment=True; augment=False gives the fixed tiling")
        self.epoch_length = max(1, int(epoch_length if epoch_length is not None else len(self.tiles)))
        # Crops are spread over the images in proportion to their area.
        area = np.array([label.size for label in self.labels], dtype=np.float64)
        self._image_p = area / area.sum()
        self.seed, self.epoch = int(seed), 0
        self.flips, self.rotations, self.gray_value, self.elastic = flips, rotations, gray_value, elastic
        self.elastic_grid, self.elastic_std = elastic_grid, float(elastic_std)

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __len__(self):
        return self.epoch_length if self.augment else len(self.tiles)

    def __getitem__(self, index):
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        if not self.augment:
            return self._item(*self.tiles[index], rng=None)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        k = int(rng.choice(len(self.images), p=self._image_p))
        height, width = self.labels[k].shape
        o = self.output_size
        y0 = int(rng.integers(0, height - o + 1)) if height > o else _tile_starts(height, o)[0]
        x0 = int(rng.integers(0, width - o + 1)) if width > o else _tile_starts(width, o)[0]
        return self._item(k, y0, x0, rng)

    def _item(self, k, y0, x0, rng):
        image, labels, weights = self.images[k], self.labels[k], self.weights[k]
        t, o, m = self.tile_size, self.output_size, self.margin
        augment = rng is not None
        field = None
        if augment and self.elastic and self.elastic_std > 0:
            field = displacement_field((t, t), rng, self.elastic_grid, self.elastic_std)
        # Cut a border wide enough for every displaced sample (+2 for the cubic support), so the
        # deformation pulls in real (or image-mirrored) content rather than a mirror of the tile.
        pad = int(math.ceil(np.abs(field).max())) + 2 if field is not None else 0
        rows = _reflect_index(np.arange(y0 - m - pad, y0 + o + m + pad), labels.shape[0])
        cols = _reflect_index(np.arange(x0 - m - pad, x0 + o + m + pad), labels.shape[1])
        image = image[:, rows[:, None], cols]
        labels = labels[rows[:, None], cols]
        weights = weights[rows[:, None], cols]

        if augment and self.flips and rng.integers(2):
            image, labels, weights = image[..., ::-1], labels[..., ::-1], weights[..., ::-1]
        if augment and self.rotations:
            turns = int(rng.integers(4))
            image, labels, weights = (np.rot90(a, turns, axes=(-2, -1)) for a in (image, labels, weights))

        if field is not None:
            coords = np.indices((t, t), dtype=np.float64) + field + pad
            image = _warp(np.ascontiguousarray(image), coords, order=3)
            inner = coords[:, m:m + o, m:m + o]
            labels = _warp(np.ascontiguousarray(labels), inner, order=0)
            weights = _warp(np.ascontiguousarray(weights), inner, order=0)
        else:
            labels, weights = labels[m:m + o, m:m + o], weights[m:m + o, m:m + o]

        if augment and self.gray_value:
            contrast = float(rng.uniform(0.8, 1.2))
            brightness = float(rng.uniform(-0.1, 0.1))
            gamma = math.exp(rng.uniform(math.log(0.7), math.log(1.4)))
            image = contrast * image + brightness
            image = np.sign(image) * np.abs(image) ** gamma

        return (torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
                torch.from_numpy((labels > 0).astype(np.int64)),
                torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32)))


# --------------------------------------------------------------------------------------------
# Train/validation split


def split_image(image, labels, fraction=0.75, axis=-1):
    """Split one image and its labels into a train part (the first `fraction` along `axis`,
    by default the left 3/4 of the width) and a validation part (the rest).

    image: (H, W) or (C, H, W); labels: (H, W); `axis` counts from the end (-1 width,
    -2 height) for both. Returns ``(train_image, train_labels), (val_image, val_labels)``
    (copies). Cells cut by the split line stay as partial cells on both sides.
    """
    image, labels = np.asarray(image), np.asarray(labels)
    if axis not in (-1, -2):
        raise ValueError(f"axis must be -1 (width) or -2 (height), got {axis}")
    if image.shape[-2:] != labels.shape or labels.ndim != 2:
        raise ValueError(f"need image (H, W) or (C, H, W) and labels (H, W), "
                         f"got {image.shape} and {labels.shape}")
    size = labels.shape[axis]
    cut = int(round(fraction * size))
    if not 0 < cut < size:
        raise ValueError(f"fraction {fraction} leaves an empty part of a size-{size} axis")

    def part(array, span):
        index = (Ellipsis, span) if axis == -1 else (Ellipsis, span, slice(None))
        return np.ascontiguousarray(array[index])

    first, rest = slice(None, cut), slice(cut, None)
    return (part(image, first), part(labels, first)), (part(image, rest), part(labels, rest))
