"""torch.autocast reaches every op, with stock PyTorch's policy for the op it replaces: the
convolutions run in the autocast dtype (as F.conv2d), crop_concat promotes (as torch.cat),
max_pool2x2 keeps its input's dtype (as F.max_pool2d), the loss computes and returns float32
(as F.cross_entropy). Values against stock under the same autocast (our error against float64 at
most twice stock's), the UNet against reference.UNet, torch.compile, channels_last, clear errors.
CPU: bfloat16; CUDA (on the GPU lease): bfloat16 and float16 (+ GradScaler in test_unet_cuda.py)."""
import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import unet_ext
from unet_ext import ops, reference

from conftest import assert_low_precision, to_layout

AUTOCAST = [pytest.param("cpu", torch.bfloat16, id="cpu-bfloat16"),
            pytest.param("cuda", torch.bfloat16, marks=pytest.mark.cuda, id="cuda-bfloat16"),
            pytest.param("cuda", torch.float16, marks=pytest.mark.cuda, id="cuda-float16")]


def _conv_args(device, op):
    """float32 arguments of `op` (leaf tensors requiring grad) and the matching reference op."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device).requires_grad_()
    if op == "conv2d_relu_concat":
        return (randn(2, 6, 20, 21), randn(2, 5, 16, 17), randn(7, 11, 3, 3, scale=0.2), randn(7), 1)
    if op == "conv_transpose2x2":
        return (randn(2, 6, 9, 10), randn(6, 5, 2, 2, scale=0.3), randn(5))
    return (randn(2, 6, 18, 19), randn(7, 6, 3, 3, scale=0.2), randn(7), 1)


CONV_OPS = ["conv2d_relu", "conv2d_bias", "conv2d_relu_concat", "conv_transpose2x2"]


@pytest.mark.parametrize("op", CONV_OPS)
@pytest.mark.parametrize("device,dtype", AUTOCAST)
def test_convolutions_run_in_the_autocast_dtype(device, dtype, op):
    args = _conv_args(device, op)
    with torch.autocast(device, dtype=dtype):
        ours = getattr(ops, op)(*args)
        stock = getattr(reference, op)(*args)
    assert stock.dtype == dtype
    assert ours.dtype == dtype
    exact = getattr(reference, op)(*(a.double() if torch.is_tensor(a) else a for a in args))
    assert_low_precision(ours, stock, exact)
    # Gradients reach the float32 leaves in float32, close to stock's.
    grad = torch.randn_like(exact).to(dtype)
    tensors = [a for a in args if torch.is_tensor(a)]
    got = torch.autograd.grad(ours, tensors, grad)
    want = torch.autograd.grad(stock, tensors, grad)
    want_exact = torch.autograd.grad(exact, tensors, grad.double(), allow_unused=True)
    for g, w, e, leaf in zip(got, want, want_exact, tensors):
        assert g.dtype == leaf.dtype == torch.float32
        assert_low_precision(g, w, e)


@pytest.mark.parametrize("op", CONV_OPS)
@pytest.mark.parametrize("device,dtype", AUTOCAST)
def test_convolutions_leave_float64_alone(device, dtype, op):
    """Autocast does not cast float64 (stock's rule), so float64 stays exact."""
    args = [a.detach().double() if torch.is_tensor(a) else a for a in _conv_args(device, op)]
    with torch.autocast(device, dtype=dtype):
        ours = getattr(ops, op)(*args)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, getattr(reference, op)(*args), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device,dtype", AUTOCAST)
def test_convolution_channels_last_under_autocast(device, dtype):
    x, w, b, padding = _conv_args(device, "conv2d_relu")
    x = x.detach().contiguous(memory_format=torch.channels_last)
    with torch.autocast(device, dtype=dtype):
        ours = ops.conv2d_relu(x, w, b, padding)
        stock = reference.conv2d_relu(x, w, b, padding)
    assert ours.dtype == dtype and ours.is_contiguous(memory_format=torch.channels_last)
    assert_low_precision(ours, stock, reference.conv2d_relu(x.double(), w.double(), b.double(), padding))


@pytest.mark.parametrize("device,dtype", AUTOCAST)
def test_autocast_off_changes_nothing(device, dtype):
    x, w, b, padding = _conv_args(device, "conv2d_relu")
    plain = ops.conv2d_relu(x, w, b, padding)
    with torch.autocast(device, dtype=dtype, enabled=False):
        off = ops.conv2d_relu(x, w, b, padding)
    assert off.dtype == torch.float32
    assert torch.equal(off, plain)


@pytest.mark.parametrize("device,dtype", AUTOCAST)
def test_crop_concat_promotes_like_cat(device, dtype):
    skip = torch.randn(2, 3, 12, 13, device=device)
    up = torch.randn(2, 4, 8, 9, device=device).to(dtype)
    with torch.autocast(device, dtype=dtype):
        mixed = ops.crop_concat(skip, up)
        stock = reference.crop_concat(skip, up)
        low = ops.crop_concat(skip.to(dtype), up)
    assert stock.dtype == mixed.dtype == torch.float32
    assert torch.equal(mixed, stock)
    assert low.dtype == dtype
    assert torch.equal(low, reference.crop_concat(skip.to(dtype), up))
    # Differentiable through the cast: each input's gradient in its own dtype.
    skip.requires_grad_()
    up.requires_grad_()
    with torch.autocast(device, dtype=dtype):
        out = ops.crop_concat(skip, up)
    grad_skip, grad_up = torch.autograd.grad(out, [skip, up], torch.ones_like(out))
    assert grad_skip.dtype == torch.float32 and grad_up.dtype == dtype
    assert grad_skip.sum().item() == 3 * 8 * 9 * 2 and grad_up.sum().item() == 4 * 8 * 9 * 2


@pytest.mark.parametrize("device,dtype", AUTOCAST)
def test_max_pool_keeps_its_input_dtype(device, dtype):
    x = torch.randn(2, 3, 10, 11, device=device)
    with torch.autocast(device, dtype=dtype):
        for t in (x, x.to(dtype)):
            out, stock = ops.max_pool2x2(t), F.max_pool2d(t, 2)
            assert out.dtype == stock.dtype == t.dtype
            assert torch.equal(out, stock)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("device,dtype", AUTOCAST)
def test_loss_computes_and_returns_float32(device, dtype, reduction):
    torch.manual_seed(0)
    logits = (torch.randn(2, 3, 17, 19, device=device) * 3).to(dtype).requires_grad_()
    target = torch.randint(0, 3, (2, 17, 19), device=device)
    weight_map = torch.rand(2, 17, 19, device=device) + 0.5
    with torch.autocast(device, dtype=dtype):
        ours = ops.weighted_cross_entropy(logits, target, weight_map, reduction=reduction)
        stock = reference.weighted_cross_entropy(logits, target, weight_map, reduction=reduction)
    assert stock.dtype == ours.dtype == torch.float32
    # Ours computes in float32 from the 16-bit values: float32 agreement with the exact loss of
    # those values. Stock is not always that close: on CUDA, cross_entropy hands log_softmax the
    # input's dtype, so autocast leaves its output in 16 bits (relative error ~ the dtype's eps,
    # seen on an H200 with torch 2.11); ours must never be further from exact than stock.
    exact_loss = reference.weighted_cross_entropy(logits.detach().double(), target, weight_map.double(),
                                                  reduction=reduction)
    torch.testing.assert_close(ours.double(), exact_loss, rtol=2e-5, atol=2e-6)
    scale = exact_loss.abs().max().item()
    assert (ours.double() - exact_loss).abs().max() <= (stock.double() - exact_loss).abs().max() + 1e-6 * scale
    grad = torch.rand_like(ours)
    got, = torch.autograd.grad(ours, logits, grad)
    want, = torch.autograd.grad(stock, logits, grad)
    assert got.dtype == want.dtype == dtype
    exact, = torch.autograd.grad(
        reference.weighted_cross_entropy(logits.double(), target, weight_map.double(), reduction=reduction),
        logits, grad.double())
    assert_low_precision(got, want, exact)


class _OpLog(TorchDispatchMode):
    """Every op below autograd and autocast: (op, tensor arguments, tensor outputs)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        self.calls.append((func, tensors, [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]))
        return out


# (shape, layout): odd sizes, channels_last read in place, a strided view (re-laid out in its own
# dtype), (N, C) logits, an empty batch.
LOSS_CASES = [((2, 3, 17, 19), "contiguous"), ((2, 3, 17, 19), "channels_last"),
              ((3, 2, 5, 7), "strided"), ((33, 4), "contiguous"), ((0, 3, 5, 6), "contiguous")]


@pytest.mark.parametrize("shape,layout", LOSS_CASES, ids=[f"{s}-{l}" for s, l in LOSS_CASES])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("logits_dtype", [torch.bfloat16, torch.float16], ids=["bf16-logits", "fp16-logits"])
@pytest.mark.parametrize("device,dtype", AUTOCAST)
def test_loss_reads_16bit_logits_without_a_float32_copy(device, dtype, logits_dtype, reduction, shape, layout):
    """Under autocast the kernels read the 16-bit logits themselves (float32 math inside): the
    forward and backward ops get the 16-bit tensor, no op makes a float32 tensor the logits'
    size, the loss is float32 and equals stock's (which reads a float32 copy) to float32
    precision, and the logits' gradient comes back in their dtype within stock's error."""
    torch.manual_seed(0)
    n, c, *spatial = shape
    logits = to_layout((torch.randn(shape) * 3).to(device=device, dtype=logits_dtype), layout)
    logits.requires_grad_()
    target = torch.randint(0, c, (n, *spatial), device=device)
    target[torch.rand(target.shape, device=device) < 0.1] = -100
    weight_map = torch.rand(n, *spatial, device=device) + 0.5
    upstream = torch.rand(target.shape if reduction == "none" else (), device=device)
    with _OpLog() as log, torch.autocast(device, dtype=dtype):
        ours = ops.weighted_cross_entropy(logits, target, weight_map, reduction=reduction)
        got, = torch.autograd.grad(ours, logits, upstream)
    with torch.autocast(device, dtype=dtype):
        stock = reference.weighted_cross_entropy(logits, target, weight_map, reduction=reduction)
    want, = torch.autograd.grad(stock, logits, upstream)
    assert ours.dtype == stock.dtype == torch.float32
    assert got.dtype == want.dtype == logits_dtype and got.shape == logits.shape
    ours_ops = {str(func): args[0 if "forward" in str(func) else 1].dtype
                for func, args, _ in log.calls if "weighted_cross_entropy" in str(func)}
    assert ours_ops == {"unet_ext._weighted_cross_entropy_forward.default": logits_dtype,
                        "unet_ext._weighted_cross_entropy_backward.default": logits_dtype}
    if logits.numel():
        copies = [str(func) for func, _, outs in log.calls
                  for t in outs if t.dtype == torch.float32 and t.numel() >= logits.numel()]
        assert not copies, copies
    torch.testing.assert_close(ours, stock, rtol=2e-5, atol=2e-6, equal_nan=True)
    exact_in = logits.detach().double().requires_grad_()
    exact, = torch.autograd.grad(
        reference.weighted_cross_entropy(exact_in, target, weight_map.double(), reduction=reduction),
        exact_in, upstream.double())
    assert_low_precision(got, want, exact)


@pytest.mark.parametrize("device,dtype", AUTOCAST)
def test_bad_input_is_still_a_clear_error(device, dtype):
    w = torch.randn(4, 3, 3, 3, device=device)
    with torch.autocast(device, dtype=dtype):
        with pytest.raises(RuntimeError, match="input must be a floating-point tensor, got Int"):
            ops.conv2d_relu(torch.ones(1, 3, 8, 8, dtype=torch.int32, device=device), w)
        with pytest.raises(RuntimeError, match="target must hold class indices"):
            ops.weighted_cross_entropy(torch.randn(1, 2, 4, 4, device=device),
                                       torch.zeros(1, 4, 4, device=device))
        with pytest.raises(RuntimeError, match="same dtype"):
            ops.crop_concat(torch.ones(1, 2, 6, 6, dtype=torch.int64, device=device),
                            torch.randn(1, 2, 4, 4, device=device))
        with pytest.raises(RuntimeError, match="weight must have shape"):
            ops.conv2d_relu(torch.randn(1, 2, 8, 8, device=device), w)


@pytest.mark.cuda
def test_mismatched_devices_under_autocast():
    x = torch.randn(1, 3, 8, 8)
    w = torch.randn(4, 3, 3, 3, device="cuda")
    for device_type in ("cpu", "cuda"):
        dtype = torch.bfloat16 if device_type == "cpu" else torch.float16
        with torch.autocast(device_type, dtype=dtype):
            with pytest.raises(RuntimeError, match="must be on the same device"):
                ops.conv2d_relu(x, w)
            with pytest.raises(RuntimeError, match="must be on the same device"):
                ops.crop_concat(torch.randn(1, 2, 6, 6), torch.randn(1, 2, 4, 4, device="cuda"))


# ------------------------------------------------------------------------------- the UNet


def assert_gradient_within_twice_stock(ours, stock, exact, name):
    """A 16-bit network's gradient is dominated by ReLUs whose output rounds to the other side of
    0 (10-30% of the norm at base 8 in bfloat16, for stock too), so a single element's error is
    a lottery: the rule (our error at most twice stock's) is applied to the norm of the error."""
    ours_err = (ours.double() - exact).norm().item()
    stock_err = (stock.double() - exact).norm().item()
    assert ours_err <= 2 * stock_err + 1e-3 * exact.norm().item(), (name, ours_err, stock_err)


def _unet_pair(device, **config):
    torch.manual_seed(0)
    ours = unet_ext.UNet(**config).to(device)
    stock = reference.UNet(**config).to(device)
    stock.load_state_dict(ours.state_dict())
    exact = reference.UNet(**config).to(device).double()
    exact.load_state_dict(ours.state_dict())
    return ours, stock, exact


@pytest.mark.parametrize("padding,size", [("valid", 92), ("same", 36)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("device,dtype", AUTOCAST)
def test_unet_under_autocast_matches_reference(device, dtype, padding, size, layout):
    ours, stock, exact = _unet_pair(device, base_channels=8, depth=3, padding=padding, num_classes=3)
    x = torch.randn(2, 1, size, size, device=device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        ours, stock = ours.to(memory_format=torch.channels_last), stock.to(memory_format=torch.channels_last)
    out_size = ours.output_size(size)
    target = torch.randint(0, 3, (2, out_size, out_size), device=device)
    weight_map = torch.rand(2, out_size, out_size, device=device) + 0.5
    with torch.autocast(device, dtype=dtype):
        out, expected = ours(x), stock(x)
        loss = ops.weighted_cross_entropy(out, target, weight_map)
        stock_loss = reference.weighted_cross_entropy(expected, target, weight_map)
    reference_out = exact(x.double())
    assert out.dtype == expected.dtype == dtype
    assert loss.dtype == stock_loss.dtype == torch.float32
    assert_low_precision(out, expected, reference_out)
    # The training step's gradients: float32, within twice stock's error of the float64 model's.
    loss.backward()
    stock_loss.backward()
    reference.weighted_cross_entropy(reference_out, target, weight_map.double()).backward()
    for (name, p), q, e in zip(ours.named_parameters(), stock.parameters(), exact.parameters()):
        assert p.grad.dtype == torch.float32, name
        assert_gradient_within_twice_stock(p.grad, q.grad, e.grad, name)


class _ConvLayouts(TorchDispatchMode):
    """(input channels, whether the input is channels_last) of every convolution op."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith("unet_ext.conv") and "backward" not in name:
            x = args[0]
            self.seen.append((x.shape[1], x.shape[1] > 1 and x.stride(1) == 1))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("threshold", [None, 64], ids=["default", "threshold64"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_unet_cpu_bf16_runs_its_onednn_levels_channels_last(layout, threshold, monkeypatch):
    """Under CPU bf16 autocast, the levels whose convolutions go to oneDNN (all by default; from
    UNET_EXT_BF16_ONEDNN_CHANNELS channels) run channels_last (no nhwc reorders per convolution),
    the shallower ones NCHW; the output comes back in the input's layout, within twice stock's
    error of the float64 model."""
    import unet_ext.model as model_module
    if not model_module._BF16_ONEDNN:
        pytest.skip("no bf16 oneDNN on this CPU: every level runs in the input's layout")
    if threshold is not None:  # what the model reads at import, and the kernels per call
        monkeypatch.setattr(model_module, "_BF16_ONEDNN_CHANNELS", threshold)
        monkeypatch.setenv("UNET_EXT_BF16_ONEDNN_CHANNELS", str(threshold))
    ours, stock, _ = _unet_pair("cpu", base_channels=32, depth=2, num_classes=3)
    x = torch.randn(2, 1, 60, 60)
    if layout == "channels_last":
        x = torch.empty_like(x, memory_format=torch.channels_last).copy_(x)
    with _ConvLayouts() as seen, torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours(x)
    # (input channels, channels_last) of each convolution, in call order: encoder levels 0-2,
    # decoder levels 1 and 0 (up-conv, merge conv, conv), head. An NCHW input with threshold 64:
    # level 0 (32 channels: our kernels) NCHW, levels 1-2 (64 and 128: oneDNN) channels_last,
    # the up-conv into level 0 NCHW (the level boundary); by default every level channels_last.
    # A channels_last input: channels_last throughout. (1 channel: reported as not.)
    nchw_levels = [False, False, True, True, True, True, True, True, True, False, False, False, False]
    channels = [1, 32, 32, 64, 64, 128, 128, 64, 64, 64, 32, 32, 32]
    expected = [(c, c > 1 if layout == "channels_last" or threshold is None else cl)
                for c, cl in zip(channels, nchw_levels)]
    assert seen.seen == expected
    assert out.dtype == torch.bfloat16
    if layout == "contiguous":
        assert out.is_contiguous()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = stock(x)
    exact = reference.UNet(base_channels=32, depth=2, num_classes=3).double()
    exact.load_state_dict(ours.state_dict())
    assert_low_precision(out, expected, exact(x.double()))


@pytest.mark.parametrize("device,dtype", AUTOCAST)
def test_unet_compiled_under_autocast(device, dtype):
    torch._dynamo.reset()
    ours, stock, exact = _unet_pair(device, base_channels=4, depth=2)
    x = torch.randn(2, 1, 60, 60, device=device, requires_grad=True)

    def step(model, x):
        with torch.autocast(device, dtype=dtype):
            out = model(x)
            return out, ops.weighted_cross_entropy(out, (x[:, 0, 20:40, 20:40] > 0).long())
    compiled = torch.compile(step, fullgraph=True)
    out, loss = compiled(ours, x)
    eager_out, eager_loss = step(ours, x)
    assert out.dtype == eager_out.dtype == dtype and loss.dtype == torch.float32
    torch.testing.assert_close(out, eager_out, rtol=0, atol=0)
    torch.testing.assert_close(loss, eager_loss)
    got = torch.autograd.grad(loss, [x, *ours.parameters()])
    want = torch.autograd.grad(eager_loss, [x, *ours.parameters()])
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_float16_grad_scaler_step_matches_stock():
    """fp16 autocast + GradScaler: the scaled backward runs through our fp16 kernels, the
    unscaled float32 gradients are finite and within twice stock's error of float64's, and the
    scaler's step and update behave as stock's (no inf found, the same scale afterwards)."""
    device = "cuda"
    ours, stock, exact = _unet_pair(device, base_channels=8, depth=3)
    x = torch.randn(2, 1, 92, 92, device=device)
    out_size = ours.output_size(92)
    target = torch.randint(0, 2, (2, out_size, out_size), device=device)
    weight_map = torch.rand(2, out_size, out_size, device=device) + 0.5
    scales = []
    for model, loss_fn in ((ours, ops.weighted_cross_entropy), (stock, reference.weighted_cross_entropy)):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the weights stay comparable
        scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 12)
        with torch.autocast(device, dtype=torch.float16):
            logits = model(x)
            loss = loss_fn(logits, target, weight_map)
        assert logits.dtype == torch.float16 and loss.dtype == torch.float32
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        scaler.step(optimizer)
        scaler.update()
        scales.append(scaler.get_scale())
    assert scales[0] == scales[1] == 2.0 ** 12  # no inf/NaN found in either
    reference.weighted_cross_entropy(exact(x.double()), target, weight_map.double()).backward()
    for (name, p), q, e in zip(ours.named_parameters(), stock.parameters(), exact.parameters()):
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
        assert_gradient_within_twice_stock(p.grad, q.grad, e.grad, name)


@pytest.mark.parametrize("threshold", [0, 10**9], ids=["onednn", "ours"])
@pytest.mark.parametrize("op", CONV_OPS)
def test_cpu_bf16_paths_both_within_twice_stock_error(op, threshold, monkeypatch):
    """CPU bf16 convolutions run on oneDNN from UNET_EXT_BF16_ONEDNN_CHANNELS input channels (all
    by default) and on our kernels below: both paths, forward and backward, by the rule."""
    monkeypatch.setenv("UNET_EXT_BF16_ONEDNN_CHANNELS", str(threshold))
    g = torch.Generator().manual_seed(3)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).requires_grad_()
    if op == "conv2d_relu_concat":
        args = (randn(1, 32, 14, 14), randn(1, 32, 10, 10), randn(16, 64, 3, 3, scale=0.05), randn(16), 0)
    elif op == "conv_transpose2x2":
        args = (randn(1, 64, 6, 7), randn(64, 16, 2, 2, scale=0.1), randn(16))
    else:
        args = (randn(1, 64, 12, 13), randn(16, 64, 3, 3, scale=0.05), randn(16), 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = getattr(ops, op)(*args)
        stock = getattr(reference, op)(*args)
    exact = getattr(reference, op)(*(a.double() if torch.is_tensor(a) else a for a in args))
    assert ours.dtype == torch.bfloat16
    assert_low_precision(ours, stock, exact)
    grad = torch.randn(exact.shape, generator=g).to(torch.bfloat16)
    tensors = [a for a in args if torch.is_tensor(a)]
    got = torch.autograd.grad(ours, tensors, grad)
    want = torch.autograd.grad(stock, tensors, grad)
    want_exact = torch.autograd.grad(exact, tensors, grad.double())
    for a, b, e in zip(got, want, want_exact):
        assert_low_precision(a, b, e)


# ---------------------------------------------- CPU bf16: channels_last weights (_cast_weight)


class _Ops(TorchDispatchMode):
    """Records the name of every op dispatched below autograd."""

    def __enter__(self):
        self.names = []
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def _channels_last_leaf(t):
    return torch.empty_like(t, memory_format=torch.channels_last).copy_(t).detach().requires_grad_()


def _needs_bf16_wgrad_kernel():
    import unet_ext.model as model_module
    if not model_module._BF16_ONEDNN or os.environ.get("UNET_EXT_CPU_ISA", "avx512") != "avx512":
        pytest.skip("CPU bf16 convolutions run on oneDNN only with bf16 dot products")
    try:
        with open("/proc/cpuinfo") as f:
            has = "avx512_bf16" in f.read()
    except OSError:
        has = False
    if not has:
        pytest.skip("our bf16 weight gradient needs AVX512-BF16")


def _backward_calls(fn):
    """The aten::convolution_backward calls (oneDNN's) that fn makes."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.name == "aten::convolution_backward" for e in prof.events())


# in channels, out channels, kernel, height, width, padding, batch, threads, shared chunk bytes
# (UNET_EXT_BF16_WGRAD_CHUNK_BYTES: 600000 holds two of those images, 100000 two output rows)
BF16_WGRAD_CASES = {
    "private sums, row chunks, odd width": (32, 32, 3, 70, 301, 0, 2, None, None),
    "padding 1, three images": (16, 48, 3, 9, 13, 1, 3, None, None),
    "out channels not whole vectors": (32, 20, 3, 13, 15, 0, 1, None, None),
    "shared sums, images in registers": (256, 256, 3, 10, 11, 0, 3, None, None),
    "shared sums, one thread": (256, 256, 3, 10, 11, 0, 3, 1, None),
    "shared sums, groups of images": (256, 256, 3, 10, 11, 1, 5, None, 600000),
    "shared sums, chunks of rows": (256, 256, 3, 20, 11, 0, 2, None, 100000),
    "shared sums, columns split": (1280, 48, 3, 6, 7, 0, 2, None, None),  # 3 (ky) x 1 channel blocks
    "private sums, one thread": (64, 64, 3, 21, 22, 0, 2, 1, None),
    "1x1": (32, 2, 1, 12, 9, 0, 2, None, None),
}


@pytest.mark.parametrize("case", BF16_WGRAD_CASES, ids=list(BF16_WGRAD_CASES))
def test_cpu_bf16_channels_last_weight_gradient_by_our_kernel(case, monkeypatch):
    """Under CPU bf16 autocast a channels_last convolution's weight and bias gradients come from
    our AVX512-BF16 kernel (csrc/ops/cpu/conv_wgrad_bf16.cpp; oneDNN makes only dgrad): every
    gradient within twice stock's error of float64, over private and shared sums, paddings, odd
    widths, output channels off the vector width, 1x1 kernels, one thread, and shared sums over
    groups of images, chunks of rows and split columns; with
    UNET_EXT_BF16_WGRAD=0 oneDNN makes them (one more convolution_backward call)."""
    _needs_bf16_wgrad_kernel()
    ci, co, k, h, w_, pad, n, threads, chunk_bytes = BF16_WGRAD_CASES[case]
    if chunk_bytes is not None:
        monkeypatch.setenv("UNET_EXT_BF16_WGRAD_CHUNK_BYTES", str(chunk_bytes))
    g = torch.Generator().manual_seed(7)
    x = _channels_last_leaf(torch.randn(n, ci, h, w_, generator=g))
    w = (torch.randn(co, ci, k, k, generator=g) / (ci * k * k) ** 0.5).requires_grad_()
    b = (torch.randn(co, generator=g) * 0.1).requires_grad_()
    op = "conv2d_relu" if k == 3 else "conv2d_bias"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = getattr(ops, op)(x, w, b, pad)
        stock = getattr(reference, op)(x, w, b, pad)
    exact = getattr(reference, op)(x.double(), w.double(), b.double(), pad)
    grad = torch.randn(exact.shape, generator=g).to(torch.bfloat16)
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        got = torch.autograd.grad(ours, (x, w, b), grad, retain_graph=True)
        assert _backward_calls(lambda: torch.autograd.grad(ours, (w, b), grad, retain_graph=True)) == 0
        monkeypatch.setenv("UNET_EXT_BF16_WGRAD", "0")
        assert _backward_calls(lambda: torch.autograd.grad(ours, (w, b), grad, retain_graph=True)) == 1
    finally:
        torch.set_num_threads(previous)
    want = torch.autograd.grad(stock, (x, w, b), grad)
    want_exact = torch.autograd.grad(exact, (x, w, b), grad.double())
    for name, a, s_, e in zip(("input", "weight", "bias"), got, want, want_exact):
        assert a.dtype == s_.dtype, name
        assert_low_precision(a, s_, e, floor=1e-4)


@pytest.mark.parametrize("padding", [0, 1])
def test_cpu_bf16_concat_weight_gradient_reads_the_crop_window_and_up(padding):
    """conv2d_relu_concat's bf16 channels_last backward: our weight gradient reads the skip's
    crop window and up where they lie (no concatenation made), oneDNN's dgrad gets only the
    input's shape: grad_skip (zero outside the window), grad_up, weight and bias within twice
    stock's error of float64."""
    _needs_bf16_wgrad_kernel()
    g = torch.Generator().manual_seed(8)
    skip = _channels_last_leaf(torch.randn(2, 32, 21, 20, generator=g))
    up = _channels_last_leaf(torch.randn(2, 16, 14, 13, generator=g))
    w = (torch.randn(32, 48, 3, 3, generator=g) / (48 * 9) ** 0.5).requires_grad_()
    b = (torch.randn(32, generator=g) * 0.1).requires_grad_()
    args = (skip, up, w, b, padding)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = ops.conv2d_relu_concat(*args)
        stock = reference.conv2d_relu_concat(*args)
    exact = reference.conv2d_relu_concat(*(a.double() if torch.is_tensor(a) else a for a in args))
    grad = torch.randn(exact.shape, generator=g).to(torch.bfloat16)
    tensors = (skip, up, w, b)
    got = torch.autograd.grad(ours, tensors, grad, retain_graph=True)
    assert _backward_calls(lambda: torch.autograd.grad(ours, tensors, grad)) == 1  # dgrad only
    want = torch.autograd.grad(stock, tensors, grad)
    want_exact = torch.autograd.grad(exact, tensors, grad.double())
    for a, s_, e in zip(got, want, want_exact):
        assert a.dtype == s_.dtype
        assert_low_precision(a, s_, e, floor=1e-4)


@pytest.mark.parametrize("grad_layout", ["contiguous", "channels_last"])
def test_cpu_bf16_one_channel_input_backward_follows_the_gradient_layout(grad_layout):
    """A one-channel input is NCHW and channels_last at once; its layer's backward takes the output
    gradient's layout (not NCHW by default: the ReLU mask of a channels_last gradient written as
    NCHW cost 15 ms at the step's first layer). Every gradient within twice stock's error."""
    g = torch.Generator().manual_seed(10)
    x = _channels_last_leaf(torch.randn(2, 1, 23, 21, generator=g))
    w = (torch.randn(16, 1, 3, 3, generator=g) / 3).requires_grad_()
    b = (torch.randn(16, generator=g) * 0.1).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = ops.conv2d_relu(x, w, b, 0)
        stock = reference.conv2d_relu(x, w, b, 0)
    exact = reference.conv2d_relu(x.double(), w.double(), b.double(), 0)
    grad = to_layout(torch.randn(exact.shape, generator=g).to(torch.bfloat16), grad_layout)
    got = torch.autograd.grad(ours, (x, w, b), grad)
    want = torch.autograd.grad(stock, (x, w, b), grad)
    want_exact = torch.autograd.grad(exact, (x, w, b), grad.double())
    for a, s_, e in zip(got, want, want_exact):
        assert a.dtype == s_.dtype
        assert_low_precision(a, s_, e, floor=1e-4)


def test_cpu_bf16_weight_gradient_non_finite_values_where_float64_has_them():
    """An infinity or NaN in the input or the gradient reaches the weight and bias gradients of
    our bf16 kernel exactly where it reaches float64's (same NaN, same signed infinities): padded
    pixels and the zero pixel that ends an odd row must not turn 0 * inf into NaN. (Stock's oneDNN
    does: an infinity in the last input column, which tap kx = 1 never reads, makes its kx = 1
    weights NaN.)"""
    _needs_bf16_wgrad_kernel()
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 32, 12, 15, generator=g)
    x[0, 3, 5, 7] = float("inf")
    x[1, 30, 0, 14] = float("-inf")  # last column: unpadded, read by tap kx = 2 only
    x[1, 2, 11, 0] = float("nan")
    x = _channels_last_leaf(x)
    w = (torch.randn(32, 32, 3, 3, generator=g) * 0.05).requires_grad_()
    b = torch.zeros(32, requires_grad=True)
    for pad in (0, 1):
        grad = torch.randn(2, 32, 10 + 2 * pad, 13 + 2 * pad, generator=g).to(torch.bfloat16)
        grad[1, 5, 3, 4] = float("inf")  # and in the gradient: an infinite bias gradient too
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = ops.conv2d_bias(x, w, b, pad)
        ours = torch.autograd.grad(y, (w, b), grad)
        exact = torch.autograd.grad(reference.conv2d_bias(x.double(), w.double(), b.double(), pad), (w, b),
                                    grad.double())
        assert ours[0].isnan().any() and ours[0].isinf().any() and ours[1].isinf().any()
        for a, e in zip(ours, exact):
            assert torch.equal(a.isnan(), e.isnan()) and torch.equal(a.isinf(), e.isinf()), pad
            assert torch.equal(a[a.isinf()].double(), e[e.isinf()]), pad


@pytest.mark.parametrize("op", CONV_OPS)
def test_cpu_bf16_channels_last_convolutions_cast_the_weight_channels_last(op):
    """With channels_last activations under CPU bf16 autocast (the UNet's layout where oneDNN has
    bf16 dot products), the float32 NCHW weight goes to bf16 channels_last in one pass
    (unet_ext._cast_weight), which oneDNN then reads without its clones; values and every
    gradient within twice stock's error, the weight's float32 gradient in the weight's layout."""
    import unet_ext.model as model_module
    args = list(_conv_args("cpu", op))
    activations = 2 if op == "conv2d_relu_concat" else 1
    for i in range(activations):
        args[i] = _channels_last_leaf(args[i])
    weight = args[activations]
    with _Ops() as seen, torch.autocast("cpu", dtype=torch.bfloat16):
        ours = getattr(ops, op)(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stock = getattr(reference, op)(*args)
    exact = getattr(reference, op)(*(a.double() if torch.is_tensor(a) else a for a in args))
    if model_module._BF16_ONEDNN:
        assert "unet_ext::_cast_weight" in seen.names
    assert ours.dtype == torch.bfloat16 and ours.is_contiguous(memory_format=torch.channels_last)
    assert_low_precision(ours, stock, exact)
    grad = torch.randn(exact.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    tensors = [a for a in args if torch.is_tensor(a)]
    got = torch.autograd.grad(ours, tensors, grad.to(ours.dtype))
    want = torch.autograd.grad(stock, tensors, grad.to(stock.dtype))
    want_exact = torch.autograd.grad(exact, tensors, grad)
    for a, t, b, e in zip(got, tensors, want, want_exact):
        assert a.dtype == t.dtype == torch.float32 and a.shape == t.shape
        assert_low_precision(a, b, e)
    weight_grad = got[activations]
    assert weight_grad.is_contiguous() and weight.is_contiguous()


def test_cpu_bf16_weight_changed_in_place_between_steps_is_read_afresh():
    """The channels_last bf16 weight is cast per autocast region, never kept: an optimizer's
    in-place update between two forwards is seen by the second."""
    x, w, b, padding = _conv_args("cpu", "conv2d_relu")
    x = _channels_last_leaf(x)
    results = []
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = ops.conv2d_relu(x, w, b, padding)
            stock = reference.conv2d_relu(x, w, b, padding)
        results.append((ours, stock))
        with torch.no_grad():
            w.mul_(-0.5).add_(0.01)
    (first, _), (second, second_stock) = results
    assert not torch.equal(first, second)
    torch.testing.assert_close(second.float(), second_stock.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("shape", [(512, 64, 3, 3), (5, 17, 3, 3), (3, 33, 2, 2), (2, 32, 1, 1), (7, 1, 3, 3),
                                   (1, 16, 3, 3), (0, 4, 3, 3), (4, 80, 3, 3), (3, 200, 2, 2), (6, 96, 4, 4),
                                   (3, 65, 5, 5)])
def test_cast_weight_matches_to_and_casts_the_gradient_back(shape):
    """unet_ext._cast_weight(w, dtype, memory_format) is w.to(dtype, memory_format=...) bit for bit
    (NaN and infinities included; 32-wide permute tiles up to 16 taps, 16-wide vector blocks and their
    scalar tails; more taps on the 16-wide blocks), and its gradient
    comes back in the weight's dtype and layout, equal to the bf16 gradient cast."""
    w = torch.randn(shape)
    if w.numel() > 20:
        w.view(-1)[3], w.view(-1)[17], w.view(-1)[-1] = float("nan"), float("inf"), -3e38
    got = torch.ops.unet_ext._cast_weight(w, torch.bfloat16, torch.channels_last)
    want = w.to(torch.bfloat16, memory_format=torch.channels_last)
    assert got.stride() == want.stride() and got.dtype == torch.bfloat16
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
    back = torch.ops.unet_ext._cast_weight(got, torch.float32, torch.contiguous_format)
    assert back.is_contiguous() and torch.equal(back.nan_to_num(), want.float().nan_to_num())
    leaf = w.nan_to_num().requires_grad_()
    out = torch.ops.unet_ext._cast_weight(leaf, torch.bfloat16, torch.channels_last)
    grad = torch.randn(shape).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    (g,) = torch.autograd.grad(out, leaf, grad)
    assert g.dtype == torch.float32 and g.is_contiguous() and torch.equal(g, grad.float())


def test_cast_weight_opcheck():
    w = torch.randn(6, 5, 3, 3, requires_grad=True)
    torch.library.opcheck(torch.ops.unet_ext._cast_weight.default, (w, torch.bfloat16, torch.channels_last))
    wl = torch.randn(6, 5, 3, 3).to(torch.bfloat16, memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(torch.ops.unet_ext._cast_weight.default, (wl, torch.float32, torch.contiguous_format))
    with pytest.raises(RuntimeError, match="memory_format must be contiguous_format, or channels_last"):
        torch.ops.unet_ext._cast_weight(torch.randn(3, 4), torch.bfloat16, torch.channels_last)
