"""max_pool2x2 against F.max_pool2d(x, 2): every dtype (a max is exact, so bit-exact results and
gradients), layouts, odd and tiny sizes, empty batches, NaN and ties (stock's argmax rule),
gradcheck, opcheck, torch.compile, clear errors, and the UNet using it."""
import pytest
import torch
import torch.nn.functional as F

import unet_ext
from unet_ext.ops import max_pool2x2

from conftest import LAYOUTS, device_dtype_params, to_layout

SHAPES = [
    (2, 3, 8, 10),     # even
    (1, 4, 9, 7),      # odd H and W: last row and column dropped, zero gradient there
    (3, 2, 2, 3),      # one row of windows, odd width
    (0, 4, 6, 6),      # empty batch
    (2, 16, 12, 14),   # channels_last vector width
    (1, 1, 2, 2),      # one window
]


def make(shape, dtype, device, layout, requires_grad=False):
    x = torch.randn(shape, dtype=torch.float64).to(device=device, dtype=dtype)
    return to_layout(x, layout).requires_grad_(requires_grad)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_stock_max_pool(device, dtype, layout, shape):
    x = make(shape, dtype, device, layout, True)
    out = max_pool2x2(x)
    expected = F.max_pool2d(x, 2)
    assert out.shape == expected.shape and out.dtype == dtype
    assert torch.equal(out, expected)
    if out.numel():  # the memory format stock picks (channels_last in, channels_last out)
        for fmt in (torch.contiguous_format, torch.channels_last):
            assert out.is_contiguous(memory_format=fmt) == expected.is_contiguous(memory_format=fmt)
    grad = torch.randn_like(expected)
    grad_input = torch.ops.unet_ext._max_pool2x2_backward(grad, x.detach())
    if out.numel() == 0:  # empty batch
        assert grad_input.shape == x.shape
        return
    (got,) = torch.autograd.grad(out, x, grad)
    (want,) = torch.autograd.grad(expected, x, grad)
    assert torch.equal(got, want) and torch.equal(grad_input, want)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_ties_and_nan_follow_stock(device, dtype, layout):
    """Ties: the first maximum (row-major) gets the gradient; NaN propagates and the last NaN
    of a window gets it; -inf windows and mixed signs."""
    windows = torch.tensor([
        [[1.0, 1.0], [1.0, 1.0]],                       # all tied: the first
        [[0.0, 2.0], [2.0, -1.0]],                      # tie between 2nd and 3rd: the 2nd
        [[float("nan"), 5.0], [float("nan"), 0.0]],     # two NaN: NaN out, the last NaN
        [[-float("inf"), -float("inf")], [-float("inf"), -float("inf")]],
        [[-3.0, -2.0], [-1.0, float("inf")]],
        [[7.0, float("nan")], [float("nan"), 9.0]],    # NaN out, the last NaN
    ], dtype=torch.float64)
    # (6 windows) -> a (1, 6, 2, 2) tensor: one window per channel.
    x = to_layout(windows.unsqueeze(0).to(device=device, dtype=dtype), layout).requires_grad_()
    out, expected = max_pool2x2(x), F.max_pool2d(x, 2)
    assert torch.equal(out.isnan(), expected.isnan())
    assert torch.equal(out.nan_to_num(), expected.nan_to_num())
    grad = torch.arange(1.0, 7.0, dtype=dtype, device=device).view(1, 6, 1, 1)
    (got,) = torch.autograd.grad(out, x, grad)
    (want,) = torch.autograd.grad(expected, x, grad)
    assert torch.equal(got, want)


# Widths and channel counts around the CPU loops' vector lengths (bfloat16 runs on its raw bits:
# 8, 16 and 32 lanes), odd sizes, and the U-Net's own shapes, in every layout.
VECTOR_SHAPES = [
    (2, 37, 13, 35),   # odd everything, channels not a multiple of any vector width
    (1, 64, 31, 66),   # 64 channels (the model's), odd height
    (2, 3, 10, 71),    # long odd rows: NCHW's vector loop and its tail
    (1, 1, 3, 33),     # one channel, one window row
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", VECTOR_SHAPES, ids=str)
def test_low_precision_at_vector_widths(dtype, layout, shape):
    """Forward and backward bit-exact against F.max_pool2d (a maximum and its gradient are exact),
    with the many ties 16-bit rounding makes, a few NaN and infinities, and a non-contiguous grad_out."""
    x = torch.randn(shape, dtype=torch.float64).mul(3).round().div(3).to(dtype)  # ties in every dtype
    flat = x.view(-1)
    flat[::97] = float("nan")
    flat[5::89] = float("inf")
    flat[7::83] = -float("inf")
    x = to_layout(x, layout).requires_grad_()
    out, expected = max_pool2x2(x), F.max_pool2d(x, 2)
    assert torch.equal(out.isnan(), expected.isnan()) and torch.equal(out.nan_to_num(), expected.nan_to_num())
    grad = to_layout(torch.randn(expected.shape, dtype=torch.float64).to(dtype), "strided")
    (got,) = torch.autograd.grad(out, x, grad)
    (want,) = torch.autograd.grad(expected, x, grad)
    assert got.dtype == dtype and torch.equal(got, want)
    direct = torch.ops.unet_ext._max_pool2x2_backward(grad, x.detach())
    assert torch.equal(direct, want)
    if layout == "channels_last":
        assert direct.is_contiguous(memory_format=torch.channels_last)


def test_gradcheck():
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(max_pool2x2, (x,))
    cl = torch.randn(1, 4, 6, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(max_pool2x2, (cl,))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(device, layout):
    x = make((2, 3, 9, 8), torch.float32, device, layout, True)
    torch.library.opcheck(torch.ops.unet_ext.max_pool2x2.default, (x,))
    grad = make((2, 3, 4, 4), torch.float32, device, layout)
    torch.library.opcheck(torch.ops.unet_ext._max_pool2x2_backward.default, (grad, x.detach()))


def test_compile_fullgraph():
    x = torch.randn(2, 3, 10, 10, requires_grad=True)
    compiled = torch.compile(lambda t: max_pool2x2(t).square().sum(), fullgraph=True, backend="aot_eager")
    compiled(x).backward()
    expected = torch.autograd.grad(F.max_pool2d(x, 2).square().sum(), x)[0]
    assert torch.equal(x.grad, expected)


def test_bad_input_errors():
    with pytest.raises(RuntimeError, match="input must be a 4-D tensor"):
        torch.ops.unet_ext.max_pool2x2(torch.randn(3, 4, 4))
    with pytest.raises(RuntimeError, match="input must be a floating-point tensor"):
        torch.ops.unet_ext.max_pool2x2(torch.zeros(1, 1, 4, 4, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="height and width must be at least 2"):
        torch.ops.unet_ext.max_pool2x2(torch.randn(3, 2, 1, 5))
    with pytest.raises(RuntimeError, match="grad_out must have shape"):
        torch.ops.unet_ext._max_pool2x2_backward(torch.randn(1, 1, 3, 3), torch.randn(1, 1, 4, 4))
    with pytest.raises(RuntimeError, match="same dtype"):
        torch.ops.unet_ext._max_pool2x2_backward(torch.randn(1, 1, 2, 2, dtype=torch.float64), torch.randn(1, 1, 4, 4))


def test_module_and_unet_use_it():
    x = torch.randn(1, 2, 8, 8, requires_grad=True)
    assert torch.equal(unet_ext.nn.MaxPool2x2()(x), F.max_pool2d(x, 2))
    calls = []
    net = unet_ext.UNet(base_channels=4, depth=2, padding="same")
    original = net.pool
    net.pool = lambda t: calls.append(t.shape) or original(t)
    net(torch.randn(1, 1, 16, 16))
    assert calls == [torch.Size([1, 4, 16, 16]), torch.Size([1, 8, 8, 8])]
