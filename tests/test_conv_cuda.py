"""CUDA conv kernels (conv2d_relu, conv2d_bias, conv_transpose2x2 and their backward ops) against a
float64 reference: every dtype, both memory formats, the CUTLASS tensor-core shapes (16-bit,
channels multiple of 8) and the generic ones, padding > k - 1, empty tensors, NaN through the
ReLU, run-to-run determinism of the weight gradients, no host synchronisation."""
import os

import pytest
import torch
import torch.nn.functional as F

import unet_ext  # noqa: F401  (registers the ops)
from unet_ext import reference

pytestmark = pytest.mark.cuda

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def _err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _assert_close(ours, stock, ref, dtype):
    """float64/float32: absolute tolerance; 16-bit: at most twice stock PyTorch's error + slack."""
    if dtype in (torch.float64, torch.float32):
        tol = 1e-9 if dtype == torch.float64 else 2e-4
        assert _err(ours, ref) <= tol * max(1.0, ref.abs().max().item())
    else:
        assert _err(ours, ref) <= 2 * _err(stock, ref) + 1e-2 * max(1.0, ref.abs().max().item())


def _conv_case(shape, dtype, channels_last, with_bias=True):
    n, c_in, c_out, h, w, k, padding = shape
    gen = torch.Generator().manual_seed(0)
    x64 = torch.randn(n, c_in, h, w, generator=gen, dtype=torch.float64)
    w64 = torch.randn(c_out, c_in, k, k, generator=gen, dtype=torch.float64) / (c_in * k * k) ** 0.5
    b64 = torch.randn(c_out, generator=gen, dtype=torch.float64) if with_bias else None
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def dev(t):
        return None if t is None else t.to(dtype).cuda().contiguous(memory_format=fmt if t.dim() == 4 else torch.contiguous_format)

    return x64, w64, b64, dev(x64), dev(w64), dev(b64)


SHAPES = [
    (2, 16, 32, 12, 10, 3, 1),   # CUTLASS-eligible in 16-bit
    (1, 8, 8, 7, 9, 3, 0),       # CUTLASS-eligible, valid convolution
    (2, 3, 5, 9, 8, 3, 1),       # generic (channels not multiples of 8)
    (2, 1, 16, 11, 10, 3, 0),    # the paper's first layer: input channels zero-padded to 8 (16-bit)
    (1, 3, 8, 9, 7, 3, 1),       # RGB: the same, 3 -> 8
    (1, 8, 16, 5, 6, 1, 0),      # 1x1 head
    (1, 4, 8, 4, 5, 3, 4),       # padding > k - 1: the dgrad geometry has negative padding
    (1, 16, 16, 5, 6, 3, 4),     # the same on the CUTLASS (sm_80) kernels in 16-bit: dgrad padding -2
    (1, 16, 8, 6, 6, 5, 2),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_conv2d_forward_backward(dtype, channels_last, relu, shape):
    x64, w64, b64, x, w, b = _conv_case(shape, dtype, channels_last)
    padding = shape[-1]
    op = torch.ops.unet_ext.conv2d_relu if relu else torch.ops.unet_ext.conv2d_bias
    out = op(x, w, b, padding)
    ref = F.conv2d(x64, w64, b64, padding=padding)
    ref = torch.relu(ref) if relu else ref
    stock = F.conv2d(x, w, b, padding=padding)
    stock = torch.relu(stock) if relu else stock
    assert out.shape == ref.shape and out.dtype == dtype
    # Stock's layout (a one-channel input and weight are ambiguous: NCHW, as stock gives).
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format) or (
        shape[1] == 1 and out.is_contiguous() and stock.is_contiguous())
    assert out.stride() == stock.stride() or out.numel() == 0
    _assert_close(out.cpu(), stock.cpu(), ref, dtype)

    grad64 = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grad = grad64.to(dtype).cuda()
    gi, gw, gb = torch.ops.unet_ext._conv2d_backward(grad, x, w, out if relu else None, padding, [True, True, True])
    # Reference gradients through the same mask (our output > 0), in float64.
    mask = (out.double().cpu() > 0) if relu else torch.ones_like(ref, dtype=torch.bool)
    gm = torch.where(mask, grad64, 0)
    ref_gi = torch.nn.grad.conv2d_input(x64.shape, w64, gm, padding=padding)
    ref_gw = torch.nn.grad.conv2d_weight(x64, w64.shape, gm, padding=padding)
    stock_gi = torch.nn.grad.conv2d_input(x.shape, w, torch.where(mask.cuda(), grad, 0), padding=padding)
    stock_gw = torch.nn.grad.conv2d_weight(x, w.shape, torch.where(mask.cuda(), grad, 0), padding=padding)
    _assert_close(gi.cpu(), stock_gi.cpu(), ref_gi, dtype)
    _assert_close(gw.cpu(), stock_gw.cpu(), ref_gw, dtype)
    _assert_close(gb.cpu(), gm.sum((0, 2, 3)).to(dtype), gm.sum((0, 2, 3)), dtype)
    assert gi.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_conv2d_wgrad_is_deterministic(dtype):
    _, _, _, x, w, b = _conv_case((4, 16, 32, 40, 40, 3, 1), dtype, True)
    out = torch.ops.unet_ext.conv2d_relu(x, w, b, 1)
    grad = torch.randn_like(out)
    first = torch.ops.unet_ext._conv2d_backward(grad, x, w, out, 1, [True, True, True])
    for _ in range(3):
        again = torch.ops.unet_ext._conv2d_backward(grad, x, w, out, 1, [True, True, True])
        for a, b_ in zip(first, again):
            assert torch.equal(a, b_)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_conv2d_relu_keeps_nan_and_masks_it_in_backward(dtype):
    _, _, _, x, w, b = _conv_case((1, 8, 8, 6, 6, 3, 1), dtype, True)
    x[0, :, 2, 2] = float("nan")
    out = torch.ops.unet_ext.conv2d_relu(x, w, b, 1)
    # A direct float64 CPU convolution: NaN reaches exactly the outputs whose window holds it
    # (a Winograd/FFT cuDNN algorithm could spread it further).
    ref = torch.relu(F.conv2d(x.double().cpu(), w.double().cpu(), b.double().cpu(), padding=1))
    assert torch.equal(out.isnan().cpu(), ref.isnan())
    grad = torch.full_like(out, float("nan"))
    gi, _, _ = torch.ops.unet_ext._conv2d_backward(grad, x, w, torch.zeros_like(out), 1, [True, False, False])
    assert torch.equal(gi, torch.zeros_like(gi))  # all masked off: NaN gradients must not leak


def test_conv2d_empty_tensors():
    x = torch.randn(0, 8, 5, 5, device="cuda")
    w = torch.randn(8, 8, 3, 3, device="cuda")
    out = torch.ops.unet_ext.conv2d_relu(x, w, None, 1)
    assert out.shape == (0, 8, 5, 5)
    gi, gw, gb = torch.ops.unet_ext._conv2d_backward(out, x, w, out, 1, [True, True, True])
    assert gi.shape == x.shape and torch.equal(gw, torch.zeros_like(w)) and torch.equal(gb, torch.zeros(8, device="cuda"))
    # C_in = 0: the output is relu(bias).
    x0 = torch.randn(2, 0, 4, 4, device="cuda")
    b = torch.randn(3, device="cuda")
    out = torch.ops.unet_ext.conv2d_relu(x0, torch.randn(3, 0, 3, 3, device="cuda"), b, 1)
    assert torch.equal(out, torch.relu(b).view(1, 3, 1, 1).expand(2, 3, 4, 4))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
# (1, 16, 8, ...) and (2, 32, 24, ...): tensor cores in 16-bit (CUTLASS); the others generic.
@pytest.mark.parametrize("shape", [(2, 3, 5, 4, 7), (1, 16, 8, 6, 6), (2, 32, 24, 9, 13), (2, 1, 1, 1, 1)])
def test_conv_transpose2x2_forward_backward(dtype, channels_last, shape):
    n, c_in, c_out, h, w_ = shape
    gen = torch.Generator().manual_seed(0)
    x64 = torch.randn(n, c_in, h, w_, generator=gen, dtype=torch.float64)
    w64 = torch.randn(c_in, c_out, 2, 2, generator=gen, dtype=torch.float64)
    b64 = torch.randn(c_out, generator=gen, dtype=torch.float64)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x64.to(dtype).cuda().contiguous(memory_format=fmt)
    w = w64.to(dtype).cuda()
    b = b64.to(dtype).cuda()
    out = torch.ops.unet_ext.conv_transpose2x2(x, w, b)
    ref = reference.conv_transpose2x2(x64, w64, b64)
    _assert_close(out.cpu(), F.conv_transpose2d(x, w, b, stride=2).cpu(), ref, dtype)
    assert out.is_contiguous(memory_format=fmt)
    grad64 = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    gi, gw, gb = torch.ops.unet_ext._conv_transpose2x2_backward(grad64.to(dtype).cuda(), x, w, [True, True, True])
    x64.requires_grad_()
    w64.requires_grad_()
    F.conv_transpose2d(x64, w64, None, stride=2).backward(grad64)
    xs = x.detach().clone().requires_grad_()
    ws = w.detach().clone().requires_grad_()
    F.conv_transpose2d(xs, ws, None, stride=2).backward(grad64.to(dtype).cuda())
    _assert_close(gi.cpu(), xs.grad.cpu(), x64.grad, dtype)
    _assert_close(gw.cpu(), ws.grad.cpu(), w64.grad, dtype)
    _assert_close(gb.cpu(), grad64.sum((0, 2, 3)).to(dtype), grad64.sum((0, 2, 3)), dtype)


@pytest.mark.parametrize("shape", [(2, 16, 8, 6, 6), (1, 32, 24, 9, 13)])
def test_conv_transpose2x2_float32_runs_as_tf32_when_torch_allows_it(shape):
    """With torch.backends.cudnn.allow_tf32 the float32 up-conv takes the TF32 tensor-core
    path: forward and gradients within twice the error of stock PyTorch (cuDNN, also TF32)."""
    torch.backends.cudnn.allow_tf32 = True  # the conftest fixture restores it
    n, c_in, c_out, h, w_ = shape
    gen = torch.Generator().manual_seed(0)
    x64 = torch.randn(n, c_in, h, w_, generator=gen, dtype=torch.float64)
    w64 = torch.randn(c_in, c_out, 2, 2, generator=gen, dtype=torch.float64) / c_in ** 0.5
    b64 = torch.randn(c_out, generator=gen, dtype=torch.float64)
    x, w, b = (t.float().cuda() for t in (x64, w64, b64))
    out = torch.ops.unet_ext.conv_transpose2x2(x, w, b)
    ref = reference.conv_transpose2x2(x64, w64, b64)
    stock = F.conv_transpose2d(x, w, b, stride=2)
    assert _err(out.cpu(), ref) <= 2 * _err(stock.cpu(), ref) + 1e-3 * ref.abs().max().item()
    grad64 = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    gi, gw, _ = torch.ops.unet_ext._conv_transpose2x2_backward(grad64.float().cuda(), x, w, [True, True, False])
    x64.requires_grad_()
    w64.requires_grad_()
    F.conv_transpose2d(x64, w64, None, stride=2).backward(grad64)
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    F.conv_transpose2d(xs, ws, None, stride=2).backward(grad64.float().cuda())
    for ours, stock_g, ref_g in ((gi, xs.grad, x64.grad), (gw, ws.grad, w64.grad)):
        assert _err(ours.cpu(), ref_g) <= 2 * _err(stock_g.cpu(), ref_g) + 1e-3 * ref_g.abs().max().item()


def test_conv_ops_do_not_synchronize():
    _, _, _, x, w, b = _conv_case((2, 16, 16, 12, 12, 3, 1), torch.float16, True)
    xg = torch.randn(2, 5, 6, 6, device="cuda")
    wg = torch.randn(5, 3, 2, 2, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = torch.ops.unet_ext.conv2d_relu(x, w, b, 1)
        torch.ops.unet_ext._conv2d_backward(torch.ones_like(out), x, w, out, 1, [True, True, True])
        up = torch.ops.unet_ext.conv_transpose2x2(xg, wg, None)
        torch.ops.unet_ext._conv_transpose2x2_backward(torch.ones_like(up), xg, wg, [True, True, True])
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("shape", [(2, 16, 32, 12, 10, 3, 1), (1, 8, 12, 9, 7, 3, 0), (1, 4, 8, 5, 6, 1, 0)])
def test_conv2d_float32_runs_as_tf32_when_torch_allows_it(shape):
    """With torch.backends.cudnn.allow_tf32 (torch's default) the float32 convolutions take the
    TF32 tensor-core path, as cuDNN does: error within twice stock PyTorch's (also TF32)."""
    torch.backends.cudnn.allow_tf32 = True  # the conftest fixture restores it
    x64, w64, b64, x, w, b = _conv_case(shape, torch.float32, channels_last=True)
    padding = shape[-1]
    out = torch.ops.unet_ext.conv2d_relu(x, w, b, padding)
    ref = torch.relu(F.conv2d(x64, w64, b64, padding=padding))
    stock = torch.relu(F.conv2d(x, w, b, padding=padding))
    assert _err(out.cpu(), ref) <= 2 * _err(stock.cpu(), ref) + 1e-3 * ref.abs().max().item()
    grad = torch.randn(out.shape, device="cuda").contiguous(memory_format=torch.channels_last)
    gi, gw, _ = torch.ops.unet_ext._conv2d_backward(grad, x, w, out, padding, [True, True, False])
    gm = torch.where(out > 0, grad, 0)
    stock_gi = torch.nn.grad.conv2d_input(x.shape, w, gm, padding=padding)
    stock_gw = torch.nn.grad.conv2d_weight(x, w.shape, gm, padding=padding)
    ref_gi = torch.nn.grad.conv2d_input(x64.shape, w64, gm.double().cpu(), padding=padding)
    ref_gw = torch.nn.grad.conv2d_weight(x64, w64.shape, gm.double().cpu(), padding=padding)
    for ours, stock_g, ref_g in ((gi, stock_gi, ref_gi), (gw, stock_gw, ref_gw)):
        assert _err(ours.cpu(), ref_g) <= 2 * _err(stock_g.cpu(), ref_g) + 1e-3 * ref_g.abs().max().item()
    # And exact float32 again once TF32 is off.
    torch.backends.cudnn.allow_tf32 = False
    exact = torch.ops.unet_ext.conv2d_relu(x, w, b, padding)
    assert _err(exact.cpu(), ref) <= 2e-4 * max(1.0, ref.abs().max().item())


def _cuda_kernel_names(fn):
    """The CUDA kernels fn launches, or None under compute-sanitizer (the lease kit sets
    UNET_EXT_UNDER_SANITIZER): CUPTI takes one subscriber, so the profiler then sees none."""
    if os.environ.get("UNET_EXT_UNDER_SANITIZER"):
        fn()
        return None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [event.key for event in prof.key_averages()]


def _ran(names, fragment):
    """Whether a kernel whose name holds `fragment` ran (always true when names are unknown)."""
    return names is None or any(fragment in n for n in names)


HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 64, 32, 9, 13), (1, 24, 5, 3, 4)])
def test_up_conv_forward_is_one_gemm_on_hopper(dtype, shape):
    """On Hopper the 16-bit up-conv forward is one cuBLAS GEMM with the bias in it, then one
    interleaving copy (the sm_80 strided dgrad ran at 0.66-0.83x cuDNN there on lease 2); the
    values match stock's within twice its error, any channel count, either input layout."""
    n, c_in, c_out, h, w_ = shape
    gen = torch.Generator().manual_seed(0)
    x64 = torch.randn(n, c_in, h, w_, generator=gen, dtype=torch.float64)
    w64 = torch.randn(c_in, c_out, 2, 2, generator=gen, dtype=torch.float64) / c_in ** 0.5
    b64 = torch.randn(c_out, generator=gen, dtype=torch.float64)
    w, b = w64.to(dtype).cuda(), b64.to(dtype).cuda()
    for fmt in (torch.channels_last, torch.contiguous_format):
        x = x64.to(dtype).cuda().contiguous(memory_format=fmt)
        names = _cuda_kernel_names(lambda: torch.ops.unet_ext.conv_transpose2x2(x, w, b))
        assert names is None or not any(k in n_ for n_ in names for k in ("StridedDgrad", "up_forward_kernel")), names
        out = torch.ops.unet_ext.conv_transpose2x2(x, w, b)
        stock = F.conv_transpose2d(x, w, b, stride=2)
        assert out.shape == stock.shape and out.stride() == stock.stride()
        _assert_close(out.cpu(), stock.cpu(), reference.conv_transpose2x2(x64, w64, b64), dtype)


@pytest.mark.skipif(not unet_ext.build_info()["cutlass_sm80"], reason="needs a build with CUTLASS")
@pytest.mark.parametrize("c_in,c_out,k,relu", [(1, 64, 3, True), (3, 64, 3, True), (64, 2, 1, False), (5, 3, 3, True),
                                               (3, 20, 5, False)],
                         ids=["grey", "rgb", "head", "both", "rgb-5x5-partial-group"])
def test_unaligned_channels_run_on_tensor_cores(c_in, c_out, k, relu):
    """Channel counts off the tensor cores' alignment (the first layer's 1 or 3 input channels, the
    head's 2 classes) never reach the generic kernels (3x cuDNN's time there on the first H200
    lease): a thin input's forward runs the thin-input kernel, the rest tensor cores on channels
    padded with zeros."""
    torch.manual_seed(0)
    x = torch.randn(2, c_in, 40, 36, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(c_out, c_in, k, k, device="cuda") / (k * c_in ** 0.5)).bfloat16()
    b = torch.randn(c_out, device="cuda").bfloat16()
    op = torch.ops.unet_ext.conv2d_relu if relu else torch.ops.unet_ext.conv2d_bias
    act = torch.relu if relu else (lambda t: t)
    names = _cuda_kernel_names(lambda: op(x, w, b, 0))
    assert names is None or not any("conv_direct_kernel" in n for n in names), names
    assert c_in > 4 or _ran(names, "conv_thin_input_kernel"), names
    out = op(x, w, b, 0)
    stock = act(F.conv2d(x, w, b))
    assert out.shape == stock.shape and out.stride() == stock.stride()
    exact = act(F.conv2d(x.double(), w.double(), b.double()))
    _assert_close(out.cpu(), stock.cpu(), exact.cpu(), torch.bfloat16)
    grad = torch.randn_like(out)
    saved = out if relu else None
    backward = lambda: torch.ops.unet_ext._conv2d_backward(grad, x, w, saved, 0, [True, True, True])  # noqa: E731
    names = _cuda_kernel_names(backward)
    assert names is None or not any(n_ in n for n in names for n_ in ("conv_direct_kernel", "conv_wgrad_kernel")), names
    gi, gw, gb = backward()
    assert gi.shape == x.shape and gw.shape == w.shape and gb.shape == b.shape
    # The exact gradients through the same ReLU mask as ours.
    masked = grad.double() * (out > 0) if relu else grad.double()
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    F.conv2d(x64, w64).backward(masked)
    xs, ws = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    F.conv2d(xs, ws).backward(masked.to(torch.bfloat16))
    _assert_close(gi.cpu(), xs.grad.cpu(), x64.grad.cpu(), torch.bfloat16)
    _assert_close(gw.cpu(), ws.grad.cpu(), w64.grad.cpu(), torch.bfloat16)
    _assert_close(gb.cpu(), masked.sum((0, 2, 3)).to(torch.bfloat16).cpu(), masked.sum((0, 2, 3)).cpu(), torch.bfloat16)


@pytest.mark.skipif(not (HOPPER and unet_ext.build_info()["cutlass_sm90a"]),
                    reason="needs an sm_90 GPU and a build with sm_90a (TORCH_CUDA_ARCH_LIST 9.0a)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [
    (2, 64, 64, 20, 18, 3, 0),    # U-Net level 1, valid
    (1, 24, 40, 13, 11, 3, 1),    # channels not a multiple of the 64-deep K tile; same padding
    (3, 128, 64, 9, 7, 3, 0),     # pixels not a multiple of the 128-row tile
    (1, 64, 8, 7, 7, 1, 0),       # 1x1 head-like, C_out = 8
])
def test_hopper_wgmma_path_runs_and_matches(dtype, shape):
    """On an H100/H200, 16-bit fprop and dgrad run on the sm_90a wgmma/TMA kernels (their names
    in the profile) and match float64 within twice stock PyTorch's (cuDNN) error."""
    x64, w64, b64, x, w, b = _conv_case(shape, dtype, channels_last=True)
    padding = shape[-1]
    names = _cuda_kernel_names(lambda: torch.ops.unet_ext.conv2d_relu(x, w, b, padding))
    assert _ran(names, "Sm90"), names
    out = torch.ops.unet_ext.conv2d_relu(x, w, b, padding)
    ref = torch.relu(F.conv2d(x64, w64, b64, padding=padding))
    stock = torch.relu(F.conv2d(x, w, b, padding=padding))
    _assert_close(out.cpu(), stock.cpu(), ref, dtype)
    no_bias = torch.ops.unet_ext.conv2d_bias(x, w, None, padding)
    _assert_close(no_bias.cpu(), F.conv2d(x, w, None, padding=padding).cpu(), F.conv2d(x64, w64, None, padding=padding), dtype)

    grad64 = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grad = grad64.to(dtype).cuda().contiguous(memory_format=torch.channels_last)
    names = _cuda_kernel_names(
        lambda: torch.ops.unet_ext._conv2d_backward(grad, x, w, out, padding, [True, False, False]))
    assert _ran(names, "Sm90"), names
    gi, _, _ = torch.ops.unet_ext._conv2d_backward(grad, x, w, out, padding, [True, False, False])
    gm = torch.where(out.cpu().double() > 0, grad64, 0)
    ref_gi = torch.nn.grad.conv2d_input(x64.shape, w64, gm, padding=padding)
    stock_gi = torch.nn.grad.conv2d_input(x.shape, w, torch.where(out > 0, grad, 0), padding=padding)
    _assert_close(gi.cpu(), stock_gi.cpu(), ref_gi, dtype)


@pytest.mark.skipif(not (HOPPER and unet_ext.build_info()["cutlass_sm90a"]),
                    reason="needs an sm_90 GPU and a build with sm_90a (TORCH_CUDA_ARCH_LIST 9.0a)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_hopper_wgrad_on_deep_layers(dtype):
    """A 512 -> 512 layer's weight gradient has 4 x 36 output tiles: it runs on the sm_90a wgrad
    kernel (no split-K), deterministic, within twice stock PyTorch's error."""
    x64, w64, b64, x, w, b = _conv_case((2, 512, 512, 10, 9, 3, 1), dtype, channels_last=True)
    out = torch.ops.unet_ext.conv2d_relu(x, w, b, 1)
    grad64 = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grad = grad64.to(dtype).cuda().contiguous(memory_format=torch.channels_last)

    def wgrad():
        return torch.ops.unet_ext._conv2d_backward(grad, x, w, out, 1, [False, True, False])[1]

    names = _cuda_kernel_names(wgrad)
    assert _ran(names, "Sm90"), names
    gw = wgrad()
    assert torch.equal(gw, wgrad())
    gm = torch.where(out.cpu().double() > 0, grad64, 0)
    ref_gw = torch.nn.grad.conv2d_weight(x64, w64.shape, gm, padding=1)
    stock_gw = torch.nn.grad.conv2d_weight(x, w.shape, torch.where(out > 0, grad, 0), padding=1)
    _assert_close(gw.cpu(), stock_gw.cpu(), ref_gw, dtype)


def test_tf32_follows_the_conv_flag_of_the_new_api():
    """torch >= 2.9 has torch.backends.cudnn.conv.fp32_precision beside the legacy allow_tf32;
    asking the legacy flag alone throws when the two disagree. "ieee" for convolutions means
    exact float32 on our kernels too, whatever the legacy flag says."""
    conv_flags = getattr(torch.backends.cudnn, "conv", None)
    if conv_flags is None or not hasattr(conv_flags, "fp32_precision"):
        pytest.skip("this torch has no torch.backends.cudnn.conv.fp32_precision")
    x64, w64, b64, x, w, b = _conv_case((2, 64, 64, 16, 16, 3, 1), torch.float32, channels_last=True)
    saved = conv_flags.fp32_precision
    try:
        conv_flags.fp32_precision = "ieee"
        out = torch.ops.unet_ext.conv2d_relu(x, w, b, 1)
        ref = torch.relu(F.conv2d(x64, w64, b64, padding=1))
        # TF32 (10-bit mantissa) would be off by ~1e-3 here; IEEE float32 by ~1e-6.
        assert _err(out.cpu(), ref) <= 1e-4 * ref.abs().max().item()
        conv_flags.fp32_precision = "tf32"
        out_tf32 = torch.ops.unet_ext.conv2d_relu(x, w, b, 1)
        assert _err(out_tf32.cpu(), ref) <= 2e-2 * ref.abs().max().item()
    finally:
        conv_flags.fp32_precision = saved


@pytest.mark.parametrize("op", ["conv2d", "conv_transpose2x2"])
def test_batches_past_2gib_stay_on_tensor_cores(op):
    """CUTLASS 2.x refuses tensors of 2^31 bytes or more; a batch that big runs as several
    tensor-core launches (not on the generic kernels, whose wgrad takes seconds): the same values
    as stock on the first and last images, and the weight gradient over the whole batch."""
    torch.manual_seed(0)
    c, size = 64, 128  # 2 MiB per fp16 image: 1025 images pass 2^31 bytes
    batch = (1 << 31) // (c * size * size * 2) + 1
    x = torch.randn(batch, c, size, size, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    if op == "conv2d":
        w = (torch.randn(c, c, 3, 3, device="cuda") / 24).half()
        b = torch.randn(c, device="cuda").half()
        run = lambda: torch.ops.unet_ext.conv2d_bias(x, w, b, 1)  # noqa: E731
        stock = lambda t: F.conv2d(t, w.float(), b.float(), padding=1)  # noqa: E731
    else:
        w = (torch.randn(c, c, 2, 2, device="cuda") / 16).half()
        b = torch.randn(c, device="cuda").half()
        run = lambda: torch.ops.unet_ext.conv_transpose2x2(x, w, b)  # noqa: E731
        stock = lambda t: F.conv_transpose2d(t, w.float(), b.float(), stride=2)  # noqa: E731
    names = _cuda_kernel_names(run)
    generic = ("conv_direct_kernel", "up_forward_kernel")
    assert names is None or not any(g in n for n in names for g in generic), names
    out = run()
    for i in (0, batch - 1):
        ref = stock(x[i:i + 1].float()).half()
        assert _err(out[i:i + 1], ref) <= 2e-2 * max(1.0, ref.abs().max().item())
    grad = torch.randn_like(out)
    del out
    if op == "conv2d":
        backward = lambda: torch.ops.unet_ext._conv2d_backward(grad, x, w, None, 1, [False, True, False])[1]  # noqa: E731
        ref_gw = torch.nn.grad.conv2d_weight(x, w.shape, grad, padding=1).float()
    else:
        backward = lambda: torch.ops.unet_ext._conv_transpose2x2_backward(grad, x, w, [False, True, False])[1]  # noqa: E731
        stock_w = w.detach().clone().requires_grad_()
        F.conv_transpose2d(x, stock_w, None, stride=2).backward(grad)
        ref_gw = stock_w.grad.float()
    names = _cuda_kernel_names(backward)
    assert names is None or not any(g in n for n in names for g in ("conv_wgrad_kernel", "up_wgrad_kernel")), names
    gw = backward().float()
    assert _err(gw, ref_gw) <= 2e-2 * ref_gw.abs().max().item()
