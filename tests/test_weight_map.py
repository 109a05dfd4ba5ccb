"""weight_map (U-Net paper eq. 2) against a brute-force reference (one full-image distance
transform per cell), class weights, batches, numpy/tensor in and out, errors, and the stardist
nuclei mask."""
import importlib.util
import math
import os
import time

import numpy as np
import pytest
import torch
from scipy import ndimage

from unet_ext.weight_map import weight_map

W0, SIGMA = 10.0, 5.0


def brute_force(labels, w0=W0, sigma=SIGMA, w_bg=0.0, w_fg=0.0):
    cells = [c for c in np.unique(labels) if c != 0]
    w = np.where(labels > 0, w_fg, w_bg).astype(np.float64)
    if len(cells) < 2:
        return w
    d = np.sort(np.stack([ndimage.distance_transform_edt(labels != c) for c in cells]), axis=0)
    return w + np.where(labels == 0, w0 * np.exp(-(d[0] + d[1]) ** 2 / (2 * sigma ** 2)), 0.0)


def random_labels(seed, shape=(64, 64), n_cells=12):
    """Disks of random radius, some of them placed to touch an earlier one, with label gaps."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int32)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    ids = rng.choice(np.arange(1, 5 * n_cells), n_cells, replace=False)
    centres = []
    for cell in ids:
        r = rng.integers(2, 8)
        if centres and rng.random() < 0.5:  # right next to an earlier disk
            cy, cx, cr = centres[rng.integers(len(centres))]
            angle = rng.random() * 2 * np.pi
            cy, cx = cy + (cr + r + 1) * np.sin(angle), cx + (cr + r + 1) * np.cos(angle)
        else:
            cy, cx = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        centres.append((cy, cx, r))
        labels[((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (labels == 0)] = cell
    return labels


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("sigma", [2.0, 5.0, 12.0])
def test_matches_brute_force(seed, sigma):
    labels = random_labels(seed)
    assert len(np.unique(labels)) > 3
    ours = weight_map(labels, w0=W0, sigma=sigma, class_weight=(0.5, 2.0))
    ref = brute_force(labels, sigma=sigma, w_bg=0.5, w_fg=2.0)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5 * W0)


def test_matches_brute_force_dense():
    labels = random_labels(7, shape=(48, 80), n_cells=40)
    np.testing.assert_allclose(weight_map(labels, class_weight=(0, 0)), brute_force(labels),
                               rtol=0, atol=1e-5 * W0)


@pytest.mark.parametrize("labels", [np.zeros((8, 9), np.int64),
                                    np.pad(np.full((3, 3), 4, np.int64), 3)])
@pytest.mark.parametrize("class_weight", [None, (0.3, 3.0)])
def test_fewer_than_two_cells_gives_class_weight_only(labels, class_weight):
    w_bg, w_fg = class_weight or (1.0, 1.0)
    np.testing.assert_array_equal(weight_map(labels, class_weight=class_weight),
                                  np.where(labels > 0, w_fg, w_bg).astype(np.float32))


def test_balanced_hand_checked():
    labels = np.zeros((4, 4), np.uint8)
    labels[1:3, 1:3] = 7  # 4 foreground, 12 background pixels
    w = weight_map(labels)  # one cell: no border term
    expected = np.full((4, 4), 16 / (2 * 12), np.float32)
    expected[1:3, 1:3] = 16 / (2 * 4)
    np.testing.assert_allclose(w, expected, rtol=1e-6)
    assert w.mean() == pytest.approx(1.0)


def test_balanced_with_one_class_absent_is_one():
    np.testing.assert_array_equal(weight_map(np.zeros((5, 6), np.int32)), np.ones((5, 6), np.float32))
    np.testing.assert_array_equal(weight_map(np.full((5, 6), 3)), np.ones((5, 6), np.float32))


def test_class_weight_variants_differ_only_by_w_c():
    labels = random_labels(3)
    border = brute_force(labels)
    fg = labels > 0
    n = labels.size
    balanced = np.where(fg, n / (2 * fg.sum()), n / (2 * (~fg).sum()))
    for class_weight, w_c in [("balanced", balanced), (None, np.ones(labels.shape)),
                              ((2, 5), np.where(fg, 5.0, 2.0)), ([0.0, 1.5], np.where(fg, 1.5, 0.0))]:
        np.testing.assert_allclose(weight_map(labels, class_weight=class_weight), border + w_c,
                                   rtol=1e-6, atol=1e-5 * W0)


def test_w0_zero_is_class_weight_only():
    labels = random_labels(4)
    np.testing.assert_array_equal(weight_map(labels, w0=0, class_weight=(1, 2)),
                                  np.where(labels > 0, 2, 1).astype(np.float32))


def test_touching_cells():
    labels = np.zeros((40, 160), np.int32)
    labels[10:30, 10:30] = 1
    labels[10:30, 31:51] = 2  # column 30 is a one-pixel gap between the cells
    w = weight_map(labels, class_weight=None)
    gap = w[10:30, 30]
    np.testing.assert_allclose(gap, 1 + W0 * math.exp(-2 ** 2 / (2 * SIGMA ** 2)), rtol=1e-6)
    assert gap.min() > 1 + 0.9 * W0
    np.testing.assert_allclose(w[:, 120:], 1.0, atol=1e-6 * W0)  # > 70 px from both cells
    np.testing.assert_array_equal(w[labels > 0], 1.0)
    assert w[5, 30] < gap.min()  # falls off away from the gap


def test_huge_label_values():
    labels = random_labels(5).astype(np.int64)
    big = np.where(labels > 0, labels * 10 ** 12 + 3, 0)
    np.testing.assert_array_equal(weight_map(big), weight_map(labels))
    # no background at all, cells with ids beyond the pixel count: no border term anywhere
    full = np.full((6, 6), 10 ** 9)
    full[:, 2:] = 2 * 10 ** 9
    full[:, 4:] = 3 * 10 ** 9
    np.testing.assert_array_equal(weight_map(full), np.ones((6, 6), np.float32))


def test_batch_equals_stacked_images():
    images = [random_labels(s) for s in range(3)] + [np.zeros((64, 64), np.int32)]
    batch = np.stack(images)
    w = weight_map(batch)
    assert w.shape == batch.shape and w.dtype == np.float32
    np.testing.assert_array_equal(w, np.stack([weight_map(img) for img in images]))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.int64, np.uint64])
def test_numpy_in_numpy_out(dtype):
    labels = random_labels(1) % 250
    w = weight_map(labels.astype(dtype))
    assert isinstance(w, np.ndarray) and w.dtype == np.float32 and w.shape == labels.shape
    np.testing.assert_array_equal(w, weight_map(labels))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_tensor_in_tensor_out(device, dtype):
    labels = np.stack([random_labels(1), random_labels(2)]) % 120
    w = weight_map(torch.from_numpy(labels).to(device=device, dtype=dtype))
    assert isinstance(w, torch.Tensor) and w.dtype == torch.float32
    assert w.device.type == device and w.shape == labels.shape
    np.testing.assert_array_equal(w.cpu().numpy(), weight_map(labels))


@pytest.mark.parametrize("kwargs, match", [
    (dict(labels=np.zeros(5, np.int32)), r"labels must have shape .*\(5,\)"),
    (dict(labels=np.zeros((1, 2, 3, 4), np.int32)), r"labels .*\(1, 2, 3, 4\)"),
    (dict(labels=np.zeros((4, 4))), "labels must be integer"),
    (dict(labels=torch.zeros(4, 4)), "labels must be integer"),
    (dict(labels=np.zeros((4, 4), bool)), "labels must be integer"),
    (dict(labels=-np.ones((4, 4), np.int32)), "labels must be >= 0"),
    (dict(sigma=0.0), "sigma"),
    (dict(sigma=-1.0), "sigma"),
    (dict(w0=-1.0), "w0"),
    (dict(w0=float("nan")), "w0"),
    (dict(class_weight="equal"), "class_weight"),
    (dict(class_weight=(1.0,)), "class_weight"),
    (dict(class_weight=(1.0, -2.0)), "class_weight"),
    (dict(class_weight=(1.0, 2.0, 3.0)), "class_weight"),
])
def test_errors(kwargs, match):
    kwargs = {"labels": np.zeros((4, 4), np.int32), **kwargs}
    with pytest.raises(ValueError, match=match):
        weight_map(**kwargs)


def _nuclei_mask():
    spec = importlib.util.find_spec("stardist")
    if spec is None:
        pytest.skip("stardist is not installed")
    import tifffile
    return tifffile.imread(os.path.join(spec.submodule_search_locations[0], "data", "images", "mask2d.tif"))


def test_nuclei_mask():
    labels = _nuclei_mask()
    assert labels.shape == (512, 512)
    start = time.perf_counter()
    w = weight_map(labels)
    elapsed = time.perf_counter() - start
    w_c = weight_map(labels, w0=0)
    assert w.shape == (512, 512) and w.dtype == np.float32
    assert np.isfinite(w).all()
    assert w.max() > w_c.max()
    assert elapsed < 2.0, f"{elapsed:.2f} s"
    crop = labels[:128, :128]  # a crop is small enough for the brute force
    np.testing.assert_allclose(weight_map(crop, class_weight=(0, 0)), brute_force(crop),
                               rtol=0, atol=1e-5 * W0)
