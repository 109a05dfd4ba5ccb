"""crop_concat against slice + torch.cat: dtypes, layouts, odd sizes, gradients, opcheck, compile."""
import subprocess
import sys

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


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("offset", [0, 1, 3], ids=lambda o: f"offset{o}")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_alignments_match_cpu(dtype, offset, layout):
    # Long runs (rows of 64+ elements, 48 channels) take the 16-byte path; a storage offset
    # and odd crop margins shift source and destination alignment apart (scalar path) or
    # together (vector body between scalar head and tail).
    def make_offset(shape):
        x = torch.randint(0, 100, shape).to(dtype)
        x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
        flat = torch.zeros(x.numel() + offset, dtype=dtype, device="cuda")
        view = flat[offset:].as_strided(x.shape, x.stride())
        view.copy_(x)
        return view

    skip, up = make_offset((2, 48, 75, 70)), make_offset((2, 40, 66, 64))
    out = crop_concat(skip, up)
    assert torch.equal(out.cpu(), reference.crop_concat(skip.cpu(), up.cpu()))
    if dtype.is_floating_point:
        grad = torch.randn(out.shape, dtype=torch.float64).to(dtype).cuda()
        grad = grad.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else grad
        got = torch.ops.unet_ext._crop_concat_backward(grad, 48, 75, 70)
        want = torch.ops.unet_ext._crop_concat_backward(grad.cpu(), 48, 75, 70)
        for g, w in zip(got, want):
            assert g.stride() == w.stride() and torch.equal(g.cpu(), w)


@pytest.mark.cuda
def test_cuda_does_not_synchronize():
    skip = torch.randn(2, 8, 20, 20, device="cuda")
    up = torch.randn(2, 8, 16, 16, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = torch.ops.unet_ext.crop_concat(skip, up)
        torch.ops.unet_ext._crop_concat_backward(out, 8, 20, 20)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_large_cpu_outputs_in_huge_pages_behave_like_any_tensor(tmp_path):
    """Large outputs come from unet_ext's huge-page allocator and its cache (csrc/ops/cpu/huge_pages.h):
    same values, and the storage works with everything torch does to CPU tensors."""
    skip = torch.randn(1, 64, 260, 260)
    up = torch.randn(1, 64, 256, 256)  # output 1 x 128 x 256 x 256 floats = 32 MiB
    out = crop_concat(skip, up)
    assert out.untyped_storage().nbytes() >= 32 << 20
    torch.testing.assert_close(out, reference.crop_concat(skip, up), rtol=0, atol=0)
    torch.save(out, tmp_path / "out.pt")
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), out, rtol=0, atol=0)
    out.resize_(2, 128, 256, 256)  # grows into a new (torch-allocated) block, keeping the values
    torch.testing.assert_close(out[0], reference.crop_concat(skip, up)[0], rtol=0, atol=0)
    shared = crop_concat(skip, up).share_memory_()
    assert shared.is_shared()
    grad_skip, grad_up = torch.ops.unet_ext._crop_concat_backward(shared, 64, 260, 260)
    torch.testing.assert_close(grad_up, up, rtol=0, atol=0)
    assert grad_skip[..., 2:258, 2:258].equal(skip[..., 2:258, 2:258])


_EMPTY_CACHE_CHECK = """
import os, torch, unet_ext
from unet_ext import reference
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
skip, up = torch.randn(1, 128, 260, 260), torch.randn(1, 128, 256, 256)  # 64 MiB output
out = unet_ext.crop_concat(skip, up)
del out  # its block goes to the cache, still resident
before = rss()
unet_ext.empty_cache()
freed = before - rss()
assert freed >= 32 << 20, freed
assert torch.equal(unet_ext.crop_concat(skip, up), reference.crop_concat(skip, up))
"""


def test_empty_cache_returns_cached_output_memory():
    """unet_ext.empty_cache() frees the blocks the CPU output cache keeps (RSS drops), and later
    outputs still come out right. In a fresh process: what earlier tests left in the cache and
    in the C library's heap would blur the RSS difference."""
    result = subprocess.run([sys.executable, "-c", _EMPTY_CACHE_CHECK], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
