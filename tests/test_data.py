"""unet_ext.data: example data, image I/O, normalisation, elastic deformation, the dataset."""
import numpy as np
import pytest
import torch

from unet_ext import data
from unet_ext.weight_map import weight_map


def _stardist_data():
    try:
        return data.nuclei_files()
    except FileNotFoundError:
        return None


needs_nuclei = pytest.mark.skipif(_stardist_data() is None,
                                  reason="stardist not installed (pip install --no-deps stardist)")


def _blobs(shape=(96, 96), n=12, seed=0):
    """Instance labels of n random discs, and the matching (1, H, W) float image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.indices(shape)
    labels = np.zeros(shape, np.int32)
    for k in range(1, n + 1):
        cy, cx = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        r = rng.integers(4, 10)
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = k
    return (labels > 0).astype(np.float32)[None], labels


@pytest.fixture(scope="module")
def nuclei():
    if _stardist_data() is None:
        pytest.skip("stardist not installed")
    image, labels = data.load_nuclei()
    return data.normalize(image), labels


# ---------------------------------------------------------------- example data and files

@needs_nuclei
def test_nuclei_files_and_load():
    image_path, mask_path = data.nuclei_files()
    assert image_path.endswith("img2d.tif") and mask_path.endswith("mask2d.tif")
    image, labels = data.load_nuclei()
    assert image.shape == labels.shape == (512, 512)
    assert image.dtype == np.float32 and labels.dtype in (np.int32, np.int64)
    ids = np.unique(labels)
    # The shipped mask has 125 nuclei (ids 1..183 with gaps), not 182.
    assert ids[0] == 0 and len(ids) - 1 == 125
    assert image.max() > image.min()


def test_nuclei_files_missing(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(data.sys, "path", [])
    monkeypatch.setattr(data.site, "getsitepackages", lambda: [])
    monkeypatch.setattr(data.site, "getusersitepackages", lambda: "/nonexistent")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps stardist"):
        data.nuclei_files()


@pytest.mark.parametrize("name,array", [
    ("a.tif", np.arange(35, dtype=np.float32).reshape(5, 7)),
    ("b.tiff", np.arange(2 * 5 * 7, dtype=np.uint16).reshape(2, 5, 7)),
    ("c.png", np.arange(35, dtype=np.uint8).reshape(5, 7)),
    ("d.png", (np.arange(35, dtype=np.uint16) * 1000).reshape(5, 7)),
    ("e.png", np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)),
])
def test_read_write_round_trip(tmp_path, name, array):
    data.write_image(tmp_path / name, array)
    back = data.read_image(tmp_path / name)
    assert back.dtype == array.dtype and np.array_equal(back, array)


def test_read_write_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.tif"):
        data.read_image(tmp_path / "missing.tif")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        data.read_image(tmp_path / "broken.png")
    (tmp_path / "x.bmp").write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported"):
        data.read_image(tmp_path / "x.bmp")
    with pytest.raises(ValueError, match="PNG needs"):
        data.write_image(tmp_path / "f.png", np.zeros((4, 4), np.float32))


def _folder(tmp_path, masks):
    (tmp_path / "images").mkdir(parents=True)
    (tmp_path / "masks").mkdir()
    for stem, shape in [("b", (6, 8)), ("a", (5, 7))]:
        data.write_image(tmp_path / "images" / f"{stem}.tif", np.ones(shape, np.float32))
    for stem, shape in masks:
        data.write_image(tmp_path / "masks" / f"{stem}.png", np.ones(shape, np.uint16))
    return tmp_path


def test_load_folder_pairs(tmp_path):
    folder = _folder(tmp_path, [("a", (5, 7)), ("b", (6, 8))])
    (folder / "images" / "notes.txt").write_text("ignored")
    images, masks, names = data.load_folder(folder)
    assert names == ["a", "b"]
    assert [i.shape for i in images] == [m.shape for m in masks] == [(5, 7), (6, 8)]
    assert all(m.dtype == np.int32 for m in masks)


def test_load_folder_errors(tmp_path):
    with pytest.raises(ValueError, match=r"a\.png.*\(5, 8\).*a\.tif.*\(5, 7\)"):
        data.load_folder(_folder(tmp_path / "size", [("a", (5, 8)), ("b", (6, 8))]))
    with pytest.raises(FileNotFoundError, match="no mask for image.*b.tif"):
        data.load_folder(_folder(tmp_path / "missing", [("a", (5, 7))]))


# ---------------------------------------------------------------- normalisation

def test_normalize():
    rng = np.random.default_rng(0)
    gray = rng.gamma(2.0, 100.0, size=(40, 50)).astype(np.uint16)
    out = data.normalize(gray)
    assert out.shape == (1, 40, 50) and out.dtype == np.float32
    assert out.min() == 0 and out.max() == 1
    assert np.all(np.diff(out.ravel()[np.argsort(gray.ravel(), kind="stable")]) >= 0)  # monotone
    rgb = rng.random((40, 50, 3))
    assert data.normalize(rgb).shape == (3, 40, 50)
    chw = rng.random((2, 40, 50))
    assert data.normalize(chw).shape == (2, 40, 50)
    constant = data.normalize(np.full((8, 9), 7.0))
    assert constant.shape == (1, 8, 9) and np.all(constant == 0) and np.isfinite(constant).all()


# ---------------------------------------------------------------- elastic deformation

def test_elastic_identity_for_zero_std():
    image, labels = _blobs()
    image = image + np.random.default_rng(1).random(image.shape, dtype=np.float32)
    out_image, out_labels = data.elastic_deform(image, labels, np.random.default_rng(0), std=0.0)
    assert out_image.dtype == np.float32 and out_image.shape == image.shape
    np.testing.assert_allclose(out_image, image, atol=1e-5)
    assert np.array_equal(out_labels, labels)


def test_elastic_changes_image_and_keeps_labels():
    image, labels = _blobs()
    out_image, out_labels = data.elastic_deform(image, labels, np.random.default_rng(0), std=10.0)
    assert np.abs(out_image - image).max() > 0.5
    assert out_labels.dtype == labels.dtype
    assert set(np.unique(out_labels)) <= set(np.unique(labels))


def test_elastic_same_transform_for_image_and_labels():
    image, labels = _blobs((128, 128), n=20)
    for seed in range(3):
        out_image, out_labels = data.elastic_deform(image, labels, np.random.default_rng(seed))
        agree = np.mean((out_image[0] > 0.5) == (out_labels > 0))
        assert agree >= 0.97, agree


def test_displacement_field_smooth_and_scaled():
    field = data.displacement_field((64, 80), np.random.default_rng(0), grid=3, std=10.0)
    assert field.shape == (2, 64, 80)
    assert np.abs(np.diff(field, axis=-1)).max() < 5  # smooth: no jumps between neighbours
    assert 1 < np.abs(field).max() < 60


# ---------------------------------------------------------------- dataset

@pytest.fixture(scope="module")
def nuclei_crop(nuclei):
    image, labels = nuclei
    return image[:, :256, :256], labels[:256, :256]


@pytest.mark.parametrize("tile,output", [(252, 68), (188, 4), (128, 128)])
def test_dataset_items(nuclei_crop, tile, output):
    image, labels = nuclei_crop
    ds = data.SegmentationDataset([image], [labels], tile, output, weight_map_kwargs={"w0": 10, "sigma": 5})
    assert len(ds) == len(data._tile_starts(256, output)) ** 2
    for i in range(3):
        x, target, weight = ds[i]
        assert x.shape == (1, tile, tile) and x.dtype == torch.float32
        assert target.shape == weight.shape == (output, output)
        assert target.dtype == torch.int64 and weight.dtype == torch.float32
        assert set(target.unique().tolist()) <= {0, 1}
        assert torch.isfinite(x).all()
        assert torch.isfinite(weight).all() and (weight > 0).all()


def test_dataset_determinism(nuclei_crop):
    image, labels = nuclei_crop
    ds = data.SegmentationDataset(image, labels, 188, 100, epoch_length=4, seed=3)
    ds2 = data.SegmentationDataset(image, labels, 188, 100, epoch_length=4, seed=3)
    first = ds[1]
    for a, b in zip(first, ds2[1]):
        assert torch.equal(a, b)
    other_seed = data.SegmentationDataset(image, labels, 188, 100, epoch_length=4, seed=4)
    assert not torch.equal(first[0], other_seed[1][0])
    assert not torch.equal(first[0], ds[2][0])
    ds.set_epoch(1)
    assert not torch.equal(first[0], ds[1][0])
    ds.set_epoch(0)
    assert torch.equal(first[0], ds[1][0])


def test_dataset_geometry_consistent():
    # image == (labels > 0): after crop, flips, rotations and elastic deformation the tile's
    # centre must still match the target, and each weight must be its pixel's class weight.
    image, labels = _blobs((160, 160), n=30, seed=2)
    ds = data.SegmentationDataset(image, labels, 92, 60, gray_value=False, epoch_length=6)
    full = weight_map(labels)
    w_fg = full[labels > 0].min()
    for i in range(len(ds)):
        x, target, weight = ds[i]
        centre = x[0, 16:76, 16:76] > 0.5
        assert (centre == (target == 1)).float().mean() >= 0.97
        assert torch.allclose(weight[target == 1], torch.tensor(w_fg))
        assert (weight[target == 0] >= full[labels == 0].min() - 1e-6).all()


def test_dataset_mirrored_and_no_augment(nuclei_crop):
    image, labels = nuclei_crop
    ds = data.SegmentationDataset(image, labels, 252, 68, augment=False)
    assert ds.tiles[0] == (0, 0, 0) and ds.tiles[-1] == (0, 256 - 68, 256 - 68)
    x, target, weight = ds[0]
    y, _, _ = ds[0]
    assert torch.equal(x, y)
    m = (252 - 68) // 2
    # No augmentation: the output window is the image itself, and the margin is a mirror.
    assert np.array_equal(x[0, m:m + 68, m:m + 68].numpy(), image[0, :68, :68])
    assert np.array_equal(x[0, m - 5:m, m].numpy(), image[0, :5, 0][::-1])
    assert np.array_equal(target.numpy(), (labels[:68, :68] > 0).astype(np.int64))
    assert np.array_equal(weight.numpy(), weight_map(labels)[:68, :68])
    with pytest.raises(ValueError, match="epoch_length"):
        data.SegmentationDataset(image, labels, 252, 68, augment=False, epoch_length=5)


def test_dataset_small_image_is_padded():
    image, labels = _blobs((40, 50))
    ds = data.SegmentationDataset(image, labels, 92, 60)
    assert len(ds) == 1
    x, target, weight = ds[0]
    assert x.shape == (1, 92, 92) and target.shape == (60, 60)
    assert (weight > 0).all()


def test_dataset_dataloader_workers(nuclei_crop):
    # Worker processes give the same items as indexing in the main process, epoch included.
    image, labels = nuclei_crop
    ds = data.SegmentationDataset(image, labels, 128, 128, epoch_length=4)
    ds.set_epoch(2)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    batches = list(loader)
    assert batches[0][0].shape == (2, 1, 128, 128)
    assert batches[0][1].shape == batches[0][2].shape == (2, 128, 128)
    for i in range(4):
        for a, b in zip(ds[i], (t[i % 2] for t in batches[i // 2])):
            assert torch.equal(a, b)


# ---------------------------------------------------------------- split

def test_split_image():
    image = np.arange(3 * 8 * 12, dtype=np.float32).reshape(3, 8, 12)
    labels = np.arange(8 * 12).reshape(8, 12)
    (ti, tl), (vi, vl) = data.split_image(image, labels)
    assert ti.shape == (3, 8, 9) and tl.shape == (8, 9) and vi.shape == (3, 8, 3) and vl.shape == (8, 3)
    assert np.array_equal(np.concatenate([ti, vi], axis=-1), image)
    assert np.array_equal(np.concatenate([tl, vl], axis=-1), labels)
    (ti, tl), (vi, vl) = data.split_image(image[0], labels, fraction=0.5, axis=-2)
    assert ti.shape == tl.shape == (4, 12)
