"""crop_concat against slice + torch.cat: dtypes, layouts, odd sizes, gradients, opcheck, compile."""
import pytest
import torch

from unet_ext import reference
from unet_ext.ops import crop_concat

from conftest import LAYOUTS, device_dtype_params, to_layout

SHAPES = [  # (skip shape, up shape)
    ((2, 3, 8, 9), (2, 4, 5, 6)),      # odd crop margins
    ((1, 5, 7, 7), (1, 2, 7, 7)),      # no crop
    ((3, 1, 13, 6), (3, 1, 2, 1)),     # one channel, tiny up
    ((2, 16, 24, 40), (2, 16, 16, 32)),  # aligned rows (vector path on CUDA)
    ((0, 4, 6, 6), (0, 4, 4, 4)),      # empty batch
    ((2, 3, 9, 9), (2, 0, 4, 4)),      # no up channels
]


def make(shape, dtype, device, layout, requires_grad=False):
    x = torch.randn(shape, dtype=torch.float64).to(device=device, dtype=dtype)
    return to_layout(x, layout).requires_grad_(requires_grad)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("skip_layout", LAYOUTS)
@pytest.mark.parametrize("up_layout", LAYOUTS)
@pytest.mark.parametrize("shapes", SHAPES, ids=str)
def test_forward_backward_match_reference(device, dtype, skip_layout, up_layout, shapes):
    skip = make(shapes[0], dtype, device, skip_layout, True)
    up = make(shapes[1], dtype, device, up_layout, True)
    out = crop_concat(skip, up)
    expected = reference.crop_concat(skip, up)
    assert out.shape == expected.shape and out.dtype == dtype
    assert torch.equal(out, expected)  # a copy: bit-exact in every dtype
    grad = torch.randn_like(expected)
    got = torch.autograd.grad(out, (skip, up), grad)
    want = torch.autograd.grad(expected, (skip, up), grad)
    for g, w in zip(got, want):
        assert g.shape == w.shape and torch.equal(g, w)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_memory_format_follows_torch_cat(device):
    skip = make((2, 8, 10, 10), torch.float32, device, "channels_last")
    up = make((2, 8, 6, 6), torch.float32, device, "channels_last")
    assert crop_concat(skip, up).is_contiguous(memory_format=torch.channels_last)
    grad_skip, grad_up = torch.ops.unet_ext._crop_concat_backward(crop_concat(skip, up), 8, 10, 10)
    assert grad_skip.is_contiguous(memory_format=torch.channels_last)
    mixed = crop_concat(skip, up.contiguous())
    assert mixed.is_contiguous()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_other_dtypes_are_copied_exactly(device):
    skip = torch.randint(0, 255, (2, 3, 9, 8), dtype=torch.uint8, device=device)
    up = torch.randint(0, 255, (2, 2, 4, 5), dtype=torch.uint8, device=device)
    assert torch.equal(crop_concat(skip, up), reference.crop_concat(skip, up))


def test_gradcheck():
    skip = torch.randn(2, 3, 7, 8, dtype=torch.float64, requires_grad=True)
    up = torch.randn(2, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(crop_concat, (skip, up))
    cl_skip = skip.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    cl_up = up.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(crop_concat, (cl_skip, cl_up))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(device, layout):
    skip = make((2, 3, 9, 8), torch.float32, device, layout, True)
    up = make((2, 4, 4, 5), torch.float32, device, layout, True)
    torch.library.opcheck(torch.ops.unet_ext.crop_concat.default, (skip, up))
    grad = torch.randn(2, 7, 4, 5, device=device)
    torch.library.opcheck(torch.ops.unet_ext._crop_concat_backward.default, (grad, 3, 9, 8))


def test_compile_fullgraph():
    def f(skip, up):
        return crop_concat(skip * 2, up).relu().sum()

    skip = torch.randn(2, 3, 9, 8, requires_grad=True)
    up = torch.randn(2, 4, 4, 5, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(skip, up)
    loss.backward()
    expected_skip_grad, = torch.autograd.grad(f(skip, up), skip)
    assert torch.allclose(loss, f(skip, up))
    assert torch.equal(skip.grad, expected_skip_grad)


@pytest.mark.parametrize("skip_shape,up_shape,dtype_up,message", [
    ((2, 3, 8), (2, 3, 4, 4), None, "skip must be a 4-D tensor"),
    ((2, 3, 8, 8), (3, 4, 4), None, "up must be a 4-D tensor"),
    ((2, 3, 8, 8), (3, 3, 4, 4), None, "same batch size"),
    ((2, 3, 8, 8), (2, 3, 9, 4), None, "must not exceed skip's"),
    ((2, 3, 8, 8), (2, 3, 4, 4), torch.float64, "same dtype"),
])
def test_bad_input_raises(skip_shape, up_shape, dtype_up, message):
    skip = torch.randn(skip_shape)
    up = torch.randn(up_shape, dtype=dtype_up or torch.float32)
    with pytest.raises(RuntimeError, match=message):
        crop_concat(skip, up)


@pytest.mark.cuda
def test_mixed_devices_raise():
    with pytest.raises(RuntimeError, match="same device"):
        crop_concat(torch.randn(1, 2, 4, 4, device="cuda"), torch.randn(1, 2, 2, 2))
