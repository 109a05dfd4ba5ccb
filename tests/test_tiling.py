"""unet_ext.tiling.predict_tiled: valid tiling equals the whole image predicted at once (float64),
tiny images, same-padding blending, input forms, batching, the training flag, and errors."""
import numpy as np
import pytest
import torch

import unet_ext
from unet_ext import reference
from unet_ext.tiling import predict_tiled


def make(factory=unet_ext.UNet, seed=0, dtype=torch.float64, **config):
    torch.manual_seed(seed)
    config = {"base_channels": 4, "depth": 2, **config}
    return factory(**config).to(dtype).eval()


def mirror(x, top, bottom, left, right):
    """numpy's reflect padding (repeated when a pad exceeds the image): an independent oracle."""
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (top, bottom), (left, right)), mode="reflect")
    return torch.from_numpy(padded)


def whole_valid(model, x, margin):
    """The image predicted at once: mirrored by the margin, plus what makes a valid input size."""
    height, width = x.shape[-2:]
    size_h = model.valid_input_size(height + 2 * margin)
    size_w = model.valid_input_size(width + 2 * margin)
    padded = mirror(x, margin, size_h - height - margin, margin, size_w - width - margin)
    with torch.no_grad():
        return model(padded)[..., :height, :width]


# (factory, depth, tile_size, margin): output tiles of 20 px, so several tiles each way.
VALID = [(unet_ext.UNet, 2, 60, 20), (reference.UNet, 2, 60, 20),
         (unet_ext.UNet, 3, 108, 44), (reference.UNet, 3, 108, 44)]


@pytest.mark.parametrize("factory,depth,tile_size,margin", VALID,
                         ids=[f"{f.__module__.split('.')[-1]}-depth{d}" for f, d, _, _ in VALID])
@pytest.mark.parametrize("shape", [(1, 1, 75, 101), (2, 2, 41, 37)])
def test_valid_tiling_equals_whole_image(factory, depth, tile_size, margin, shape):
    model = make(factory, depth=depth, in_channels=shape[1], num_classes=3)
    assert (tile_size - model.output_size(tile_size)) // 2 == margin
    x = torch.randn(*shape, dtype=torch.float64)
    tiled = predict_tiled(model, x, tile_size=tile_size, batch_size=4, progress=False)
    assert tiled.shape == (shape[0], 3) + shape[2:] and tiled.dtype == torch.float64
    torch.testing.assert_close(tiled, whole_valid(model, x, margin), rtol=0, atol=1e-10)


@pytest.mark.parametrize("tile_size", [44, 60])  # 2x2 tiles of 4x4 outputs, or a single tile
def test_image_smaller_than_margin(tile_size):
    model = make()
    x = torch.randn(1, 1, 5, 7, dtype=torch.float64)  # margin 20: mirrored several times over
    tiled = predict_tiled(model, x, tile_size=tile_size, progress=False)
    torch.testing.assert_close(tiled, whole_valid(model, x, 20), rtol=0, atol=1e-10)
    one_pixel = torch.randn(1, 1, 1, 1, dtype=torch.float64)
    torch.testing.assert_close(predict_tiled(model, one_pixel, tile_size=44, progress=False),
                               whole_valid(model, one_pixel, 20), rtol=0, atol=1e-10)


def test_batch_size_does_not_change_the_result():
    model = make(padding="same")
    x = torch.randn(2, 1, 70, 50, dtype=torch.float64)
    one = predict_tiled(model, x, tile_size=32, batch_size=1, progress=False)
    three = predict_tiled(model, x, tile_size=32, batch_size=3, progress=False)
    torch.testing.assert_close(one, three, rtol=0, atol=1e-12)
    model = make()
    torch.testing.assert_close(predict_tiled(model, x, tile_size=60, batch_size=1, progress=False),
                               predict_tiled(model, x, tile_size=60, batch_size=3, progress=False),
                               rtol=0, atol=1e-12)


def test_same_single_tile_equals_direct_call():
    model = make(padding="same")
    x = torch.randn(1, 1, 20, 27, dtype=torch.float64)
    # tile 48, default overlap 12: one tile over the image mirrored by 6 on top/left.
    tiled = predict_tiled(model, x, tile_size=48, progress=False)
    with torch.no_grad():
        direct = model(mirror(x, 6, 48 - 20 - 6, 6, 48 - 27 - 6))[..., 6:26, 6:33]
    torch.testing.assert_close(tiled, direct, rtol=0, atol=1e-10)


class Pointwise(torch.nn.Module):
    """A translation-equivariant stand-in for a same-padding U-Net (a 1x1 convolution): any
    correctly placed, normalised blend of its tiles is its direct prediction."""
    depth, padding, in_channels, num_classes = 2, "same", 2, 3

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Conv2d(2, 3, 1).double()

    def forward(self, x):
        return self.head(x)


def test_same_blending_is_normalised():
    model = Pointwise()
    x = torch.randn(2, 2, 45, 70, dtype=torch.float64)
    tiled = predict_tiled(model, x, tile_size=16, overlap=6, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(tiled, model(x), rtol=0, atol=1e-10)


def test_same_blending_several_tiles():
    model = make(padding="same")
    x = torch.randn(1, 1, 100, 100, dtype=torch.float64)
    tile, overlap, pad = 64, 16, 8  # tiles start at -8, 40, 88 (in image coordinates)
    tiled = predict_tiled(model, x, tile_size=tile, overlap=overlap, progress=False)
    with torch.no_grad():  # the whole mirrored extent (3 tiles: 160 px) at once
        whole = model(mirror(x, pad, 160 - 100 - pad, pad, 160 - 100 - pad))[..., 8:108, 8:108]
    assert torch.isfinite(tiled).all()
    # Zero padding at a tile's border reaches 22 px into a depth-2 same U-Net (2+4+8+4+2 from the
    # convolutions, 2 from pooling); tiles sit on the whole image's pooling grid, so the middle
    # tile's interior (image rows/cols 40+22 .. 40+64-22) is the whole image's prediction.
    torch.testing.assert_close(tiled[..., 62:82, 62:82], whole[..., 62:82, 62:82],
                               rtol=0, atol=1e-10)
    # Blending the overlaps beats cutting them hard (overlap 0, same tile grid).
    hard = predict_tiled(model, x, tile_size=tile, overlap=0, progress=False)
    assert (tiled - whole).abs().mean() < 0.5 * (hard - whole).abs().mean()


def test_input_forms():
    model = make(dtype=torch.float32, num_classes=3)
    image = np.random.default_rng(0).integers(0, 255, size=(30, 23), dtype=np.uint8)
    from_numpy = predict_tiled(model, image, tile_size=60)
    assert from_numpy.shape == (3, 30, 23) and from_numpy.dtype == torch.float32
    assert from_numpy.device.type == "cpu"
    as_float = torch.from_numpy(image).float()
    torch.testing.assert_close(predict_tiled(model, as_float[None], tile_size=60), from_numpy)
    batched = predict_tiled(model, as_float[None, None], tile_size=60)
    assert batched.shape == (1, 3, 30, 23)
    torch.testing.assert_close(batched[0], from_numpy)
    model2 = make(dtype=torch.float32, in_channels=2)
    assert predict_tiled(model2, torch.rand(2, 9, 11), tile_size=60).shape == (2, 9, 11)


def test_autocast_bfloat16():
    model = make(dtype=torch.float32)
    x = torch.rand(1, 1, 50, 40)
    exact = predict_tiled(model, x, tile_size=60)
    low = predict_tiled(model, x, tile_size=60, autocast=torch.bfloat16)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, exact, rtol=0.1, atol=0.1 * exact.abs().max().item())


def test_training_flag_restored_and_eval_used():
    model = make(dropout=0.5).train()
    x = torch.randn(1, 1, 30, 30, dtype=torch.float64)
    first = predict_tiled(model, x, tile_size=60)
    assert model.training
    torch.testing.assert_close(predict_tiled(model, x, tile_size=60), first, rtol=0, atol=0)
    model.eval()
    predict_tiled(model, x, tile_size=60)
    assert not model.training


def test_progress_bar(capsys):
    model = make()
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    predict_tiled(model, x, tile_size=60, progress=False)
    assert capsys.readouterr().err == ""
    predict_tiled(model, x, tile_size=60, progress=True)
    assert "tiles" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs,image_shape,match", [
    ({}, (1, 1, 1, 8, 8), r"image must be \(N, C, H, W\)"),
    ({}, (8,), r"image must be \(N, C, H, W\)"),
    ({}, (1, 3, 8, 8), "3 channels but the model expects 1"),
    ({}, (1, 1, 0, 8), "image is empty"),
    ({"batch_size": 0}, (8, 8), "batch_size"),
    ({"tile_size": 61}, (8, 8), "61 is not a valid input size.*use 60 or 64"),
    ({"tile_size": 0}, (8, 8), "tile_size"),
    ({"overlap": 8}, (8, 8), "overlap applies to padding='same'"),
    ({"autocast": "bf16"}, (8, 8), "autocast"),
])
def test_errors(kwargs, image_shape, match):
    model = make()
    kwargs = {"tile_size": 60, **kwargs}
    with pytest.raises(ValueError, match=match):
        predict_tiled(model, torch.zeros(image_shape), **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    ({"tile_size": 30}, r"multiple of 2\*\*depth = 4"),
    ({"tile_size": 32, "overlap": 32}, r"overlap must be an int in \[0, tile_size=32\)"),
])
def test_same_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        predict_tiled(make(padding="same"), torch.zeros(8, 8), **kwargs)
