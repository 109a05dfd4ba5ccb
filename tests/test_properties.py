"""Property-based tests (hypothesis) of every op against unet_ext.reference on the CPU: random
shapes including 0 and 1, views with storage offsets and odd strides, channels_last, every dtype
the op takes, kernel sizes and paddings; forward and backward. CI runs the default profile
(~50 examples per op, a few hundred in all); `HYPOTHESIS_PROFILE=thorough python -m pytest -q
tests/test_properties.py` runs 20x as many (see scripts/hunt.sh for its cost)."""
import os

import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from unet_ext import ops, reference  # noqa: E402

from conftest import TOLERANCES, assert_low_precision  # noqa: E402

settings.register_profile("ci", max_examples=50, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

FLOATS = [torch.float64, torch.float32, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last", "offset_strided", "permuted"]


def make(draw, shape, dtype, low=-2.0, high=2.0):
    """A tensor of `shape` and `dtype` in one of LAYOUTS: contiguous, channels_last (4-D), a view
    into a larger buffer with a storage offset and a stride of 2 or 3 on the last dim, or a
    view whose memory order is the reverse of its dims."""
    seed = draw(st.integers(0, 2 ** 31 - 1))
    gen = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        values = torch.rand(shape, generator=gen, dtype=torch.float64) * (high - low) + low
    else:
        values = torch.randint(int(low), int(high), shape, generator=gen)
    values = values.to(dtype)
    layout = draw(st.sampled_from(LAYOUTS if len(shape) == 4 else [l for l in LAYOUTS if l != "channels_last"]))
    if layout == "channels_last":
        return values.contiguous(memory_format=torch.channels_last)
    if layout == "offset_strided":  # every dim strided oddly, the data at a storage offset
        step, offset = draw(st.sampled_from([2, 3])), draw(st.integers(1, 5))
        rows = 1
        for size in shape[:-1]:
            rows *= size
        flat = torch.zeros(offset + rows * (shape[-1] * step + 1), dtype=dtype)
        wide = flat[offset:].view(*shape[:-1], shape[-1] * step + 1)
        out = wide[..., 1:1 + shape[-1] * step:step]
        out.copy_(values)
        return out
    if layout == "permuted":
        dims = list(range(len(shape)))[::-1]
        return values.permute(dims).contiguous().permute(dims)
    return values


def leaves(tensors):
    return [t.detach().clone().requires_grad_() if t.is_floating_point() else t for t in tensors]


def assert_matches(ours, stock, dtype):
    """float64/float32 by TOLERANCES; other dtypes (ops that only move data) bit for bit."""
    if dtype in TOLERANCES:
        torch.testing.assert_close(ours, stock, equal_nan=True, **TOLERANCES[dtype])
    else:
        torch.testing.assert_close(ours, stock, equal_nan=True, rtol=0, atol=0)


def check_op(fn, ref, inputs, dtype, grad=True, exact=None):
    """Forward (values, dtype, shape) and, for float inputs, every gradient against `ref`; where
    `ref` refuses the inputs, `fn` must too. With `exact` (16-bit dtypes), values and gradients
    follow the low-precision rule against `exact` run in float64."""
    a, b = leaves(inputs), leaves(inputs)
    try:
        want = ref(*b)
    except RuntimeError:
        # Stock refuses some empty shapes (0 channels for max_pool2d, an empty 2x2 up-conv
        # input) that ours handles; anything else it refuses, ours must refuse too.
        if any(t.numel() == 0 for t in inputs):
            try:
                out = fn(*a)
            except RuntimeError:
                return
            assert out.numel() == 0
        else:
            with pytest.raises(RuntimeError):
                fn(*a)
        return
    out = fn(*a)
    assert out.shape == want.shape and out.dtype == want.dtype
    e = leaves([t.detach().double() if t.is_floating_point() else t for t in inputs])
    out64 = exact(*e) if exact is not None else None
    if exact is not None:
        assert_low_precision(out, want, out64)
    else:
        assert_matches(out, want, dtype)
    float_a = [t for t in a if t.requires_grad]
    if not grad or not float_a or out.numel() == 0:
        return
    g = torch.rand(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(out, float_a, g.to(want.dtype), allow_unused=True)
    try:
        expect = torch.autograd.grad(want, [t for t in b if t.requires_grad], g.to(want.dtype), allow_unused=True)
    except RuntimeError:  # stock's slow_conv2d backward refuses some weight layouts: same values, contiguous
        b = leaves([t.contiguous() for t in inputs])
        expect = torch.autograd.grad(ref(*b), [t for t in b if t.requires_grad], g.to(want.dtype),
                                     allow_unused=True)
    exact_grads = (torch.autograd.grad(out64, [t for t in e if t.requires_grad], g, allow_unused=True)
                   if exact is not None else [None] * len(got))
    for x, y, z in zip(got, expect, exact_grads):
        if y is None:
            assert x is None or not x.any()
        elif exact is None:
            assert_matches(x, y, dtype)
        else:
            assert_low_precision(x, y, z)


@given(st.data())
def test_crop_concat(data):
    draw = data.draw
    dtype = draw(st.sampled_from(FLOATS + [torch.int64, torch.uint8]))
    n, cs, cu = draw(st.integers(0, 2)), draw(st.integers(0, 3)), draw(st.integers(0, 3))
    h, w = draw(st.integers(0, 6)), draw(st.integers(0, 6))
    dh, dw = draw(st.integers(0, 5)), draw(st.integers(0, 5))
    skip = make(draw, (n, cs, h + dh, w + dw), dtype, 0, 9)
    up = make(draw, (n, cu, h, w), dtype, 0, 9)
    if dtype.is_floating_point:
        check_op(ops.crop_concat, reference.crop_concat, [skip, up], dtype)
    else:
        assert torch.equal(ops.crop_concat(skip, up), reference.crop_concat(skip, up))


@given(st.data())
def test_max_pool2x2(data):
    draw = data.draw
    dtype = draw(st.sampled_from(FLOATS))
    shape = (draw(st.integers(0, 2)), draw(st.integers(0, 3)), draw(st.integers(0, 9)), draw(st.integers(0, 9)))
    x = make(draw, shape, dtype)
    # Ties (likely in bfloat16) may route the gradient to another maximum: float64/32 only.
    check_op(ops.max_pool2x2, lambda t: F.max_pool2d(t, 2), [x], dtype, grad=dtype != torch.bfloat16)


@given(st.data())
def test_weighted_cross_entropy(data):
    draw = data.draw
    dtype = draw(st.sampled_from(FLOATS))
    n, c = draw(st.integers(0, 3)), draw(st.integers(1, 4))
    spatial = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=2)))
    logits = make(draw, (n, c) + spatial, dtype, -4, 4)
    target = make(draw, (n,) + spatial, torch.int64, 0, c)
    if draw(st.booleans()) and target.numel():  # some ignored pixels
        target = target.clone()
        target.view(-1)[::3] = -100
    weight_map = make(draw, (n,) + spatial, dtype, 0, 3) if draw(st.booleans()) else None
    class_weight = make(draw, (c,), dtype, 0.1, 2) if draw(st.booleans()) else None
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    # F.cross_entropy is not differentiable in its class weights: they stay constants.
    inputs = [logits] + ([weight_map] if weight_map is not None else [])

    def call(fn):
        def run(lg, *rest):
            wm = rest[0] if rest else None
            cw = class_weight.to(lg.dtype) if class_weight is not None else None
            return fn(lg, target, wm, cw, reduction=reduction)
        return run

    exact = None
    if dtype == torch.bfloat16:
        exact = call(reference.weighted_cross_entropy)
    check_op(call(ops.weighted_cross_entropy), call(reference.weighted_cross_entropy), inputs, dtype,
             exact=exact)


def conv_case(draw, concat=False):
    dtype = draw(st.sampled_from(FLOATS))
    n, c_in, c_out = draw(st.integers(0, 2)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    padding = draw(st.integers(0, 2))
    h = draw(st.integers(max(1, kh - 2 * padding), 9))
    w = draw(st.integers(max(1, kw - 2 * padding), 9))
    fan_in = c_in * kh * kw
    weight = make(draw, (c_out, c_in, kh, kw), dtype, -1 / fan_in ** 0.5, 1 / fan_in ** 0.5)
    bias = make(draw, (c_out,), dtype, -0.5, 0.5) if draw(st.booleans()) else None
    return dtype, n, c_in, h, w, weight, bias, padding


@pytest.mark.parametrize("name", ["conv2d_relu", "conv2d_bias"])
@given(data=st.data())
def test_conv2d(name, data):
    draw = data.draw
    dtype, n, c_in, h, w, weight, bias, padding = conv_case(draw)
    x = make(draw, (n, c_in, h, w), dtype)
    fn, ref = getattr(ops, name), getattr(reference, name)
    inputs = [x, weight] + ([bias] if bias is not None else [])

    def call(f):
        return lambda x, w, *b: f(x, w, b[0] if b else None, padding)

    check_op(call(fn), call(ref), inputs, dtype, exact=call(ref) if dtype == torch.bfloat16 else None)


@given(st.data())
def test_conv2d_relu_concat(data):
    draw = data.draw
    dtype, n, c_in, h, w, weight, bias, padding = conv_case(draw)
    c_skip = draw(st.integers(0, c_in))
    skip = make(draw, (n, c_skip, h + draw(st.integers(0, 4)), w + draw(st.integers(0, 4))), dtype)
    up = make(draw, (n, c_in - c_skip, h, w), dtype)
    inputs = [skip, up, weight] + ([bias] if bias is not None else [])

    def call(f):
        return lambda s, u, w, *b: f(s, u, w, b[0] if b else None, padding)

    check_op(call(ops.conv2d_relu_concat), call(reference.conv2d_relu_concat), inputs, dtype,
             exact=call(reference.conv2d_relu_concat) if dtype == torch.bfloat16 else None)


@given(st.data())
def test_conv_transpose2x2(data):
    draw = data.draw
    dtype = draw(st.sampled_from(FLOATS))
    n, c_in, c_out = draw(st.integers(0, 2)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
    x = make(draw, (n, c_in, draw(st.integers(0, 7)), draw(st.integers(0, 7))), dtype)
    weight = make(draw, (c_in, c_out, 2, 2), dtype, -0.5, 0.5)
    bias = make(draw, (c_out,), dtype) if draw(st.booleans()) else None
    inputs = [x, weight] + ([bias] if bias is not None else [])

    def call(f):
        return lambda x, w, *b: f(x, w, b[0] if b else None)

    check_op(call(ops.conv_transpose2x2), call(reference.conv_transpose2x2), inputs, dtype,
             exact=call(reference.conv_transpose2x2) if dtype == torch.bfloat16 else None)
