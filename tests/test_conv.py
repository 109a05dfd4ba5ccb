"""conv2d_relu, conv2d_bias and conv_transpose2x2 against F.conv2d / F.conv_transpose2d: dtypes,
shapes, layouts, gradients, ReLU mask, NaN, gradcheck, opcheck, compile, errors, determinism."""
import math

import pytest
import torch
import torch.nn.functional as F

import unet_ext
from unet_ext import reference
from unet_ext.ops import conv2d_bias, conv2d_relu, conv_transpose2x2

from conftest import TOLERANCES, assert_low_precision, device_dtype_params, to_layout

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
OPS = {
    "conv2d_relu": (conv2d_relu, reference.conv2d_relu),
    "conv2d_bias": (conv2d_bias, reference.conv2d_bias),
    "conv_transpose2x2": (conv_transpose2x2, reference.conv_transpose2x2),
}
UP = "conv_transpose2x2"

CONV_CASES = [  # (input shape, weight shape, padding)
    ((2, 3, 13, 17), (4, 3, 3, 3), 0),        # odd sizes, "valid"
    ((2, 3, 13, 17), (4, 3, 3, 3), 1),        # odd sizes, "same"
    ((2, 3, 9, 11), (5, 3, 3, 2), 1),         # non-square kernel
    ((1, 2, 5, 6), (3, 2, 3, 3), 3),          # padding > k - 1 (dgrad padding < 0)
    ((3, 1, 12, 10), (8, 1, 3, 3), 0),        # C_in = 1 (first layer)
    ((2, 8, 7, 9), (2, 8, 1, 1), 0),          # 1x1 head, C_out = 2
    ((2, 4, 1, 1), (3, 4, 3, 3), 1),          # 1x1 image, padded 3x3
    ((2, 4, 1, 1), (3, 4, 1, 1), 0),          # 1x1 image, 1x1 kernel
    ((0, 3, 8, 8), (4, 3, 3, 3), 1),          # empty batch
    ((2, 32, 20, 24), (48, 32, 3, 3), 0),     # more channels
    ((2, 64, 40, 40), (32, 64, 3, 3), 1),     # several row blocks per image
    ((1, 64, 6, 130), (8, 64, 3, 3), 1),      # one output row per block (row wider than a block)
    ((2, 1, 11, 45), (8, 1, 3, 3), 0),        # C_in = 1, rows of 43: the bias sum's 16 lanes and a tail
]

UP_CASES = [  # (input shape, weight shape)
    ((2, 3, 13, 17), (3, 4, 2, 2)),           # odd sizes
    ((2, 4, 1, 1), (4, 3, 2, 2)),             # 1x1 input
    ((3, 1, 7, 6), (1, 5, 2, 2)),             # C_in = 1
    ((2, 6, 5, 7), (6, 1, 2, 2)),             # C_out = 1
    ((0, 3, 4, 4), (3, 2, 2, 2)),             # empty batch
    ((2, 64, 20, 20), (64, 32, 2, 2)),        # more channels
    ((2, 64, 36, 44), (64, 32, 2, 2)),        # several row blocks per image
]

SMALL = {  # op -> (input shape, weight shape, padding): the layout / bias / requires_grad cases
    "conv2d_relu": ((2, 3, 9, 11), (5, 3, 3, 3), 1),
    "conv2d_bias": ((2, 3, 9, 11), (5, 3, 3, 3), 1),
    UP: ((2, 3, 5, 7), (3, 4, 2, 2), 0),
}


def case_id(case):
    return "x".join(map(str, case[0])) + "-w" + "x".join(map(str, case[1])) + (
        f"-p{case[2]}" if len(case) > 2 else "")


def weight_layout(w, layout):
    """contiguous | channels_last | strided | transposed (C_out/C_in swapped in memory)."""
    if layout == "transposed":
        view = w.transpose(0, 1).contiguous().transpose(0, 1)
        assert w.shape[0] <= 1 or w.shape[1] <= 1 or not view.is_contiguous()
        return view
    return to_layout(w, layout)


def unambiguous_channels_last(shape):
    return shape[1] > 1 and shape[2] * shape[3] > 1


def call(op, x, w, b, padding, fn_index=0):
    fn = OPS[op][fn_index]
    return fn(x, w, b) if op == UP else fn(x, w, b, padding)


def run_case(op, device, dtype, in_shape, w_shape, padding=0, has_bias=True, layout="contiguous",
             grad_layout="contiguous", w_layout="contiguous", needs=(True, True, True), seed=0, slack=2.0):
    """Forward and the gradients of the inputs in `needs` against the reference: float64 tight;
    other dtypes by assert_low_precision against stock PyTorch in the same dtype (`slack` times
    its error: 2, or the Winograd path's 8, see test_conv2d_matches_reference)."""
    gen = torch.Generator().manual_seed(seed)
    fan_in = w_shape[0] if op == UP else w_shape[1] * w_shape[2] * w_shape[3]
    c_out = w_shape[1] if op == UP else w_shape[0]
    x64 = torch.randn(in_shape, generator=gen, dtype=torch.float64)
    w64 = torch.randn(w_shape, generator=gen, dtype=torch.float64) / math.sqrt(max(fan_in, 1))
    b64 = torch.randn(c_out, generator=gen, dtype=torch.float64) * 0.5
    x = to_layout(x64.to(device=device, dtype=dtype), layout).requires_grad_(needs[0])
    w = weight_layout(w64.to(device=device, dtype=dtype), w_layout).requires_grad_(needs[1])
    b = b64.to(device=device, dtype=dtype).requires_grad_(needs[2]) if has_bias else None

    out = call(op, x, w, b, padding)
    assert out.dtype == dtype and out.device == x.device
    if op == UP:
        assert out.shape == (in_shape[0], c_out, 2 * in_shape[2], 2 * in_shape[3])
    else:
        assert out.shape == (in_shape[0], c_out, in_shape[2] + 2 * padding - w_shape[2] + 1,
                             in_shape[3] + 2 * padding - w_shape[3] + 1)
    if layout == "channels_last" and unambiguous_channels_last(in_shape):
        assert out.is_contiguous(memory_format=torch.channels_last)
    # The layout stock gives: channels_last when the input or the weight is (a channels_last model
    # fed an NCHW input computes in channels_last), NCHW when both are (or are ambiguously) NCHW.
    with torch.no_grad():
        stock_out = (F.conv_transpose2d(x, w, None, stride=2) if op == UP
                     else F.conv2d(x, w, None, padding=padding))
    for fmt in (torch.channels_last, torch.contiguous_format):
        assert out.is_contiguous(memory_format=fmt) == stock_out.is_contiguous(memory_format=fmt), (layout, w_layout, fmt)

    leaves = [t for t in (x, w, b) if t is not None and t.requires_grad]
    grad_out = to_layout(torch.randn(out.shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype),
                         grad_layout)
    ours_grads = torch.autograd.grad(out, leaves, grad_out) if leaves else ()
    for g, leaf in zip(ours_grads, leaves):
        assert g.shape == leaf.shape and g.dtype == dtype
    if needs[0] and layout == "channels_last" and unambiguous_channels_last(in_shape):
        assert ours_grads[0].is_contiguous(memory_format=torch.channels_last)

    def reference_run(cast, mask=None):
        args = [None if t is None else t.detach().to(cast).requires_grad_(t.requires_grad) for t in (x, w, b)]
        ref_leaves = [t for t in args if t is not None and t.requires_grad]
        ref_out = call(op, *args, padding, fn_index=1)
        target, g = ref_out, grad_out.to(cast)
        if mask is not None:  # the ReLU's derivative taken from our own output (see below)
            target, g = reference.conv2d_bias(*args, padding), g * mask.to(cast)
        grads = torch.autograd.grad(target, ref_leaves, g) if ref_leaves else ()
        return ref_out.detach(), grads

    if dtype == torch.float64:
        exact_out, exact_grads = reference_run(torch.float64)
        torch.testing.assert_close(out, exact_out, **TOLERANCES[dtype])
        for g, e in zip(ours_grads, exact_grads):
            torch.testing.assert_close(g, e, **TOLERANCES[dtype])
        return
    # In low precision a pre-activation within rounding of 0 may fall on either side of the
    # ReLU: the gradients are compared given our output's mask (the one our backward uses);
    # the mask itself is checked exactly by the float64 cases and test_relu_mask_semantics.
    mask = ~(out.detach() <= 0) if op == "conv2d_relu" else None
    exact_out, exact_grads = reference_run(torch.float64, mask)
    stock_out, stock_grads = reference_run(dtype, mask)
    floor = 1e-6 if dtype == torch.float32 else 1e-3
    assert_low_precision(out, stock_out, exact_out, slack=slack, floor=floor)
    for g, s, e in zip(ours_grads, stock_grads, exact_grads):
        assert_low_precision(g, s, e, slack=slack, floor=floor)


# The CPU's float32 Winograd F(4x4, 3x3) path (tests/test_winograd.py; README "Winograd") is
# held to the issue's bar, 8x stock float32's error; the direct path, with it switched off, to 2x.
WINOGRAD_SLACK = 8.0


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("op", ["conv2d_relu", "conv2d_bias"])
@pytest.mark.parametrize("case", CONV_CASES, ids=case_id)
@pytest.mark.parametrize("winograd", [False, True], ids=["direct", "winograd"])
def test_conv2d_matches_reference(device, dtype, op, case, winograd):
    if winograd and device != "cpu":
        pytest.skip("Winograd is a CPU path")
    with unet_ext.backends.cpu.flags(allow_winograd=winograd):
        run_case(op, device, dtype, *case, slack=WINOGRAD_SLACK if winograd else 2.0)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("case", UP_CASES, ids=case_id)
def test_conv_transpose2x2_matches_reference(device, dtype, case):
    run_case(UP, device, dtype, *case)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("grad_layout", ["contiguous", "channels_last", "strided"], ids=lambda l: f"grad_{l}")
def test_layouts(device, dtype, op, layout, grad_layout):
    run_case(op, device, dtype, *SMALL[op], layout=layout, grad_layout=grad_layout)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("w_layout", ["channels_last", "strided", "transposed"])
def test_weight_layouts(device, dtype, op, w_layout):
    run_case(op, device, dtype, *SMALL[op], w_layout=w_layout)
    run_case(op, device, dtype, *SMALL[op], layout="channels_last", w_layout=w_layout)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("op", list(OPS))
def test_bias_none(device, dtype, op):
    run_case(op, device, dtype, *SMALL[op], has_bias=False)
    run_case(op, device, dtype, *SMALL[op], has_bias=False, layout="channels_last")


NEEDS = [(False, True, True), (True, False, False), (False, True, False), (False, False, True),
         (True, True, False), (True, False, True)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("needs", NEEDS, ids=lambda n: "grad_" + "".join("xwb"[i] for i in range(3) if n[i]))
def test_requires_grad_on_some_inputs(device, op, needs):
    run_case(op, device, torch.float64, *SMALL[op], needs=needs)
    run_case(op, device, torch.float32, *SMALL[op], needs=needs, layout="channels_last")
    # .backward() fills exactly the leaves that require grad.
    in_shape, w_shape, padding = SMALL[op]
    x = torch.randn(in_shape, dtype=torch.float64, device=device).requires_grad_(needs[0])
    w = torch.randn(w_shape, dtype=torch.float64, device=device).requires_grad_(needs[1])
    c_out = w_shape[1] if op == UP else w_shape[0]
    b = torch.randn(c_out, dtype=torch.float64, device=device).requires_grad_(needs[2])
    call(op, x, w, b, padding).sum().backward()
    for t, need in zip((x, w, b), needs):
        assert (t.grad is not None) == need


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", list(OPS))
def test_no_input_requires_grad(device, op):
    run_case(op, device, torch.float64, *SMALL[op], needs=(False, False, False))
    in_shape, w_shape, padding = SMALL[op]
    x = torch.randn(in_shape, dtype=torch.float64, device=device)
    w = torch.randn(w_shape, dtype=torch.float64, device=device)
    assert not call(op, x, w, None, padding).requires_grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("mask", [(True, True, True), (True, False, False), (False, True, False),
                                  (False, False, True), (False, True, True)], ids=str)
def test_backward_ops_output_mask(device, op, mask):
    # Masked-off grads come back empty; the others match the reference.
    in_shape, w_shape, padding = SMALL[op]
    x = torch.randn(in_shape, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(w_shape, dtype=torch.float64, device=device, requires_grad=True)
    c_out = w_shape[1] if op == UP else w_shape[0]
    b = torch.randn(c_out, dtype=torch.float64, device=device, requires_grad=True)
    expected_out = call(op, x, w, b, padding, fn_index=1)
    grad_out = torch.randn_like(expected_out)
    expected = torch.autograd.grad(expected_out, (x, w, b), grad_out)
    if op == UP:
        got = torch.ops.unet_ext._conv_transpose2x2_backward(grad_out, x.detach(), w.detach(), list(mask))
    else:
        output = expected_out.detach() if op == "conv2d_relu" else None
        got = torch.ops.unet_ext._conv2d_backward(grad_out, x.detach(), w.detach(), output, padding, list(mask))
    for g, e, wanted in zip(got, expected, mask):
        if wanted:
            torch.testing.assert_close(g, e, **TOLERANCES[torch.float64])
        else:
            assert g.numel() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_relu_mask_semantics(device):
    # Channel 0: pre-activation exactly 0 everywhere (zero weights and bias); channel 1: all
    # negative; channel 2: free. conv2d_relu stops the gradient where output == 0 (as
    # F.relu does); conv2d_bias, the same kernel without ReLU, lets it through.
    x = torch.rand(2, 3, 8, 9, dtype=torch.float64, device=device) + 0.1
    w = torch.randn(3, 3, 3, 3, dtype=torch.float64, device=device)
    w[0] = 0
    w[1] = -w[1].abs()
    b = torch.tensor([0.0, -1.0, 0.1], dtype=torch.float64, device=device)
    for op in ("conv2d_relu", "conv2d_bias"):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        out = call(op, xs, ws, bs, 1)
        grad_out = torch.randn_like(out)
        gx, gw, gb = torch.autograd.grad(out, (xs, ws, bs), grad_out)
        xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
        ref = call(op, xr, wr, br, 1, fn_index=1)
        expected = torch.autograd.grad(ref, (xr, wr, br), grad_out)
        torch.testing.assert_close(out, ref, **TOLERANCES[torch.float64])
        for g, e in zip((gx, gw, gb), expected):
            torch.testing.assert_close(g, e, **TOLERANCES[torch.float64])
        if op == "conv2d_relu":
            assert (out[:, 0] == 0).all() and (out[:, 1] == 0).all()
            assert (gw[:2] == 0).all() and (gb[:2] == 0).all()
        else:
            assert (out[:, 0] == 0).all() and (out[:, 1] < 0).all()
            torch.testing.assert_close(gb, grad_out.sum((0, 2, 3)), **TOLERANCES[torch.float64])
            assert (gw[0] != 0).any() and (gw[1] != 0).any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", list(OPS))
def test_nan_propagates_like_stock(device, op):
    in_shape, w_shape, padding = SMALL[op]
    x = torch.randn(in_shape, dtype=torch.float64, device=device)
    x[1, 1, 2, 3] = float("nan")
    w = torch.randn(w_shape, dtype=torch.float64, device=device)
    c_out = w_shape[1] if op == UP else w_shape[0]
    b = torch.randn(c_out, dtype=torch.float64, device=device)
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    out = call(op, xs, ws, bs, padding)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    ref = call(op, xr, wr, br, padding, fn_index=1)
    assert out.isnan().any() and torch.equal(out.isnan(), ref.isnan())
    assert not out[0].isnan().any()  # the other image is untouched
    torch.testing.assert_close(out, ref, equal_nan=True, **TOLERANCES[torch.float64])
    grad_out = torch.randn_like(ref)
    got = torch.autograd.grad(out, (xs, ws, bs), grad_out)
    want = torch.autograd.grad(ref, (xr, wr, br), grad_out)
    failures = []
    for name, g, e in zip(("grad_input", "grad_weight", "grad_bias"), got, want):
        try:
            assert torch.equal(g.isnan(), e.isnan()), "NaN pattern differs"
            torch.testing.assert_close(g, e, equal_nan=True, **TOLERANCES[torch.float64])
        except AssertionError as error:
            failures.append(f"{name}: {error}")
    assert not failures, "\n".join(failures)


def border_pixels(height, width):
    """The four corners and a pixel in the middle of each edge."""
    return [(0, 0), (0, width - 1), (height - 1, 0), (height - 1, width - 1),
            (0, width // 2), (height // 2, 0), (height // 2, width - 1), (height - 1, width // 2)]


def assert_same_gradients(got, want, tolerances):
    failures = []
    for name, g, e in zip(("grad_input", "grad_weight", "grad_bias"), got, want):
        try:
            assert torch.equal(g.isnan(), e.isnan()), "NaN pattern differs"
            assert torch.equal(g.isinf(), e.isinf()), "inf pattern differs"
            torch.testing.assert_close(g, e, equal_nan=True, **tolerances)
        except AssertionError as error:
            failures.append(f"{name}: {error}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("padding", [0, 1])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("op", ["conv2d_relu", "conv2d_bias"])
def test_non_finite_input_at_the_border_like_stock(op, value, padding, dtype):
    """The CPU wgrad GEMMs run over "wide" rows whose extra columns read the border pixels with a
    zero gradient: 0 * NaN must not leak into taps that stock PyTorch leaves finite."""
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 3, 9, 11, generator=gen, dtype=dtype)
    w = torch.randn(5, 3, 3, 3, generator=gen, dtype=dtype)
    b = torch.randn(5, generator=gen, dtype=dtype)
    out_shape = (2, 5, 9 - 2 + 2 * padding, 11 - 2 + 2 * padding)
    grad_out = torch.randn(out_shape, generator=gen, dtype=dtype)
    for y, x in border_pixels(9, 11):
        inp = x0.clone()
        inp[1, 1, y, x] = value
        xs, ws, bs = (t.clone().requires_grad_() for t in (inp, w, b))
        xr, wr, br = (t.clone().requires_grad_() for t in (inp, w, b))
        out = call(op, xs, ws, bs, padding)
        ref = call(op, xr, wr, br, padding, fn_index=1)
        got = torch.autograd.grad(out, (xs, ws, bs), grad_out)
        want = torch.autograd.grad(ref, (xr, wr, br), grad_out)
        assert_same_gradients(got, want, TOLERANCES[dtype])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck(layout):
    def make(*shape):
        return to_layout(torch.randn(shape, dtype=torch.float64), layout).requires_grad_()

    def vec(n):
        return torch.randn(n, dtype=torch.float64, requires_grad=True)

    torch.manual_seed(0)
    for padding in (0, 1):
        assert torch.autograd.gradcheck(lambda x, w, b: conv2d_relu(x, w, b, padding),
                                        (make(2, 2, 4, 5), make(2, 2, 3, 3), vec(2)))
        assert torch.autograd.gradcheck(lambda x, w, b: conv2d_bias(x, w, b, padding),
                                        (make(2, 2, 4, 5), make(2, 2, 3, 2), vec(2)))
    assert torch.autograd.gradcheck(lambda x, w: conv2d_relu(x, w, None, 2), (make(1, 2, 3, 4), make(2, 2, 3, 3)))
    assert torch.autograd.gradcheck(conv_transpose2x2, (make(2, 3, 2, 3), make(3, 2, 2, 2), vec(2)))
    assert torch.autograd.gradcheck(lambda x, w: conv_transpose2x2(x, w), (make(1, 1, 2, 3), make(1, 2, 2, 2)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("op", ["conv2d_relu", "conv2d_bias", UP, "_conv2d_backward", "_conv_transpose2x2_backward"])
def test_opcheck(device, layout, op):
    # channels_last: input, weight and grad_out all channels_last (a model after
    # .to(memory_format=torch.channels_last)).
    def make(*shape, requires_grad=False):
        x = torch.randn(shape, device=device)
        return (to_layout(x, layout) if len(shape) == 4 else x).requires_grad_(requires_grad)

    torch.manual_seed(0)
    x, w, b = make(2, 3, 7, 8, requires_grad=True), make(4, 3, 3, 3, requires_grad=True), make(4, requires_grad=True)
    up_w, up_b = make(3, 5, 2, 2, requires_grad=True), make(5, requires_grad=True)
    if op in ("conv2d_relu", "conv2d_bias"):
        overload = getattr(torch.ops.unet_ext, op).default
        torch.library.opcheck(overload, (x, w, b, 1))
        torch.library.opcheck(overload, (x, w, None, 0))
    elif op == UP:
        torch.library.opcheck(torch.ops.unet_ext.conv_transpose2x2.default, (x, up_w, up_b))
        torch.library.opcheck(torch.ops.unet_ext.conv_transpose2x2.default, (x, up_w, None))
    elif op == "_conv2d_backward":
        x, w = x.detach(), w.detach()
        output = conv2d_relu(x, w, b.detach(), 1)
        grad = make(*output.shape)
        for out_arg in (output, None):
            for mask in ([True, True, True], [True, False, True], [False, True, False]):
                torch.library.opcheck(torch.ops.unet_ext._conv2d_backward.default, (grad, x, w, out_arg, 1, mask))
    else:
        up_grad = make(2, 5, 14, 16)
        for mask in ([True, True, True], [False, True, True], [True, False, False]):
            torch.library.opcheck(torch.ops.unet_ext._conv_transpose2x2_backward.default,
                                  (up_grad, x.detach(), up_w.detach(), mask))


def test_compile_fullgraph():
    def f(x, w1, b1, w2, b2, w3, b3):
        h = conv2d_relu(x, w1, b1, padding=1)
        u = conv_transpose2x2(h, w2, b2)
        return conv2d_bias(u * 0.5, w3, b3).square().sum()

    torch.manual_seed(0)
    args = [torch.randn(2, 3, 8, 7), torch.randn(6, 3, 3, 3), torch.randn(6), torch.randn(6, 4, 2, 2),
            torch.randn(4), torch.randn(2, 4, 1, 1), torch.randn(2)]
    args = [a.requires_grad_() for a in args]
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(*args)
    got = torch.autograd.grad(loss, args)
    expected = f(*args)
    expected_grads = torch.autograd.grad(expected, args)
    torch.testing.assert_close(loss, expected)
    for g, e in zip(got, expected_grads):
        torch.testing.assert_close(g, e)


BAD_INPUTS = [  # (op, input shape, weight shape, bias shape, padding, (x, w, b dtypes), message)
    ("conv2d_relu", (2, 3, 8, 8), (4, 5, 3, 3), None, 0, None, "weight must have shape"),
    ("conv2d_bias", (2, 3, 8, 8), (4, 3, 3, 3), (5,), 0, None, "bias must have shape"),
    ("conv2d_relu", (2, 3, 8, 8), (4, 3, 3, 3), (1, 4), 0, None, "bias must have shape"),
    ("conv2d_relu", (2, 3, 4, 4), (4, 3, 5, 5), None, 0, None, "larger than the padded input"),
    ("conv2d_bias", (2, 3, 2, 8), (4, 3, 3, 3), None, 0, None, "larger than the padded input"),
    ("conv2d_relu", (2, 3, 1, 1), (4, 3, 3, 3), None, 0, None, "larger than the padded input"),
    ("conv2d_relu", (3, 8, 8), (4, 3, 3, 3), None, 0, None, "input must be a 4-D tensor"),
    ("conv2d_bias", (2, 3, 8, 8), (4, 3, 3), None, 0, None, "weight must be a 4-D tensor"),
    ("conv2d_relu", (2, 3, 8, 8), (4, 3, 3, 3), None, -1, None, "padding must be >= 0"),
    ("conv2d_relu", (2, 3, 8, 8), (4, 3, 3, 3), None, 0, (torch.float32, torch.float64, None), "same dtype"),
    ("conv2d_bias", (2, 3, 8, 8), (4, 3, 3, 3), (4,), 0, (torch.float32, torch.float32, torch.float64),
     "same dtype"),
    (UP, (2, 3, 4, 4), (4, 3, 2, 2), None, 0, None, "weight must have shape"),
    (UP, (2, 3, 4, 4), (3, 4, 3, 3), None, 0, None, "weight must have shape"),
    (UP, (2, 3, 4, 4), (3, 4, 2, 1), None, 0, None, "weight must have shape"),
    (UP, (2, 3, 4, 4), (3, 4, 2), None, 0, None, "weight must be a 4-D tensor"),
    (UP, (3, 4, 4), (3, 4, 2, 2), None, 0, None, "input must be a 4-D tensor"),
    (UP, (2, 3, 4, 4), (3, 4, 2, 2), (3,), 0, None, "bias must have shape"),
    (UP, (2, 3, 4, 4), (3, 4, 2, 2), None, 0, (torch.float64, torch.float32, None), "same dtype"),
]


@pytest.mark.parametrize("op,in_shape,w_shape,b_shape,padding,dtypes,message", BAD_INPUTS,
                         ids=[f"{c[0]}-{c[-1]}-{i}" for i, c in enumerate(BAD_INPUTS)])
def test_bad_input_raises(op, in_shape, w_shape, b_shape, padding, dtypes, message):
    x_dtype, w_dtype, b_dtype = dtypes or (torch.float32, torch.float32, torch.float32)
    x = torch.randn(in_shape, dtype=x_dtype)
    w = torch.randn(w_shape, dtype=w_dtype)
    b = None if b_shape is None else torch.randn(b_shape, dtype=b_dtype or torch.float32)
    with pytest.raises(RuntimeError, match=message):
        call(op, x, w, b, padding)


def test_backward_ops_check_grad_out_shape():
    x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
    with pytest.raises(RuntimeError, match="grad_out must have shape"):
        torch.ops.unet_ext._conv2d_backward(torch.randn(2, 4, 8, 8), x, w, None, 0, [True, True, True])
    with pytest.raises(RuntimeError, match="grad_out must have shape"):
        torch.ops.unet_ext._conv_transpose2x2_backward(torch.randn(2, 4, 8, 8), x, torch.randn(3, 4, 2, 2),
                                                       [True, True, True])


@pytest.mark.cuda
@pytest.mark.parametrize("op", list(OPS))
def test_mixed_devices_raise(op):
    in_shape, w_shape, padding = SMALL[op]
    c_out = w_shape[1] if op == UP else w_shape[0]
    x, w, b = torch.randn(in_shape, device="cuda"), torch.randn(w_shape), torch.randn(c_out)
    with pytest.raises(RuntimeError, match="same device"):
        call(op, x, w, None, padding)
    with pytest.raises(RuntimeError, match="same device"):
        call(op, x, w.cuda(), b, padding)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("op,case", [("conv2d_relu", CONV_CASES[10]), ("conv2d_bias", CONV_CASES[10]),
                                     (UP, UP_CASES[6])], ids=["conv2d_relu", "conv2d_bias", UP])
def test_cpu_deterministic(dtype, op, case):
    # Several row blocks per image, split over the threads: wgrad/bias partial sums must be
    # added in a fixed order, so two runs agree bit for bit.
    in_shape, w_shape = case[0], case[1]
    padding = case[2] if len(case) > 2 else 0
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(in_shape, generator=gen).to(dtype)
    w = (torch.randn(w_shape, generator=gen) * 0.05).to(dtype)
    c_out = w_shape[1] if op == UP else w_shape[0]
    b = torch.randn(c_out, generator=gen).to(dtype)
    grad_out = None
    runs = []
    for _ in range(2):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        out = call(op, xs, ws, bs, padding)
        if grad_out is None:
            grad_out = torch.randn(out.shape, generator=gen).to(dtype)
        runs.append((out.detach(), *torch.autograd.grad(out, (xs, ws, bs), grad_out)))
    for a, b_ in zip(*runs):
        assert torch.equal(a, b_)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("padding", [0, 1])
@pytest.mark.parametrize("concat", [False, True])
def test_deep_float32_layers_on_onednn_match_reference(layout, padding, concat):
    """float32 layers with >= 256 input channels run on oneDNN's convolution with bias+ReLU
    post-ops (csrc/ops/cpu/conv2d_relu.cpp, use_onednn): same semantics as the other path: the
    ReLU mask from our output (NaN keeps its gradient), every output mask, the memory format."""
    gen = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x64 = torch.randn(2, 256, 9, 11, generator=gen, dtype=torch.float64)
    skip64 = torch.randn(2, 128, 13, 14, generator=gen, dtype=torch.float64)
    w64 = torch.randn(24, 256, 3, 3, generator=gen, dtype=torch.float64) / 48
    b64 = torch.randn(24, generator=gen, dtype=torch.float64)
    if concat:  # skip's 128 channels + up's 128 channels = 256
        up64 = x64[:, :128].contiguous()
        args64 = (skip64, up64)
        ref_fn = lambda s, u, w, b: torch.relu(F.conv2d(reference.crop_concat(s, u), w, b, padding=padding))
        ours_fn = lambda s, u, w, b: unet_ext.ops.conv2d_relu_concat(s, u, w, b, padding)
    else:
        args64 = (x64,)
        ref_fn = lambda x, w, b: torch.relu(F.conv2d(x, w, b, padding=padding))
        ours_fn = lambda x, w, b: unet_ext.ops.conv2d_relu(x, w, b, padding)
    args = [a.float().contiguous(memory_format=fmt).requires_grad_() for a in args64]
    w, b = w64.float().requires_grad_(), b64.float().requires_grad_()
    out = ours_fn(*args, w, b)
    ref = ref_fn(*args64, w64, b64)
    assert out.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(out, [*args, w, b], grad.float())
    leaves64 = [a.clone().requires_grad_() for a in (*args64, w64, b64)]
    mask = out.detach().double() > 0  # our mask
    want = torch.autograd.grad(ref_fn(*leaves64), leaves64, torch.where(mask, grad, 0))
    for g_ours, g_ref in zip(got, want):
        torch.testing.assert_close(g_ours.double(), g_ref, rtol=1e-4, atol=1e-4)
    for a, g_ours in zip(args, got):
        assert g_ours.is_contiguous(memory_format=fmt)


def test_deep_float32_layer_mask_keeps_the_gradient_at_nan_outputs():
    """The oneDNN path's ReLU mask zeroes the gradient where output <= 0 only: at a NaN output
    the gradient passes, as torch.relu's backward and the fused kernels do."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 256, 6, 6, generator=gen)
    w = torch.randn(8, 256, 3, 3, generator=gen) / 48
    output = torch.randn(1, 8, 4, 4, generator=gen)
    output[0, :, 1, 2] = float("nan")
    grad = torch.randn(1, 8, 4, 4, generator=gen)
    gi, gw, gb = torch.ops.unet_ext._conv2d_backward(grad, x, w, output, 0, [True, True, True])
    masked = torch.where(output <= 0, 0, grad)
    assert masked[0, :, 1, 2].ne(0).all()
    torch.testing.assert_close(gi, torch.nn.grad.conv2d_input(x.shape, w, masked), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gw, torch.nn.grad.conv2d_weight(x, w.shape, masked), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gb, masked.sum((0, 2, 3)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_deep_float32_up_conv_on_onednn_matches_reference(layout):
    """float32 up-convs with >= 512 input channels run on oneDNN's deconvolution
    (csrc/ops/cpu/conv_transpose2x2.cpp, use_onednn): values, gradients and memory format."""
    gen = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x64 = torch.randn(2, 512, 5, 7, generator=gen, dtype=torch.float64)
    w64 = torch.randn(512, 16, 2, 2, generator=gen, dtype=torch.float64) / 32
    b64 = torch.randn(16, generator=gen, dtype=torch.float64)
    x = x64.float().contiguous(memory_format=fmt).requires_grad_()
    w, b = w64.float().requires_grad_(), b64.float().requires_grad_()
    out = conv_transpose2x2(x, w, b)
    ref = F.conv_transpose2d(x64, w64, b64, stride=2)
    assert out.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(out, [x, w, b], grad.float())
    leaves = [t.clone().requires_grad_() for t in (x64, w64, b64)]
    want = torch.autograd.grad(F.conv_transpose2d(*leaves, stride=2), leaves, grad)
    for g_ours, g_ref in zip(got, want):
        torch.testing.assert_close(g_ours.double(), g_ref, rtol=1e-4, atol=1e-4)
    assert got[0].is_contiguous(memory_format=fmt)


def test_up_conv_is_the_transposed_2x1_strided_conv_the_cuda_tensor_core_path_runs():
    """The identity csrc/ops/cuda/conv_transpose2x2_cutlass.cu rests on, checked on the CPU in
    float64: read the channels_last output [N, 2H, 2W, C_out] as [N, 2H, W, 2 C_out]; with the
    filter F[ci][dy][0][dx * C_out + co] = W[ci][co][dy][dx] and stride (2, 1), the up-conv is the
    dgrad of that convolution, its dgrad the fprop, its wgrad the wgrad."""
    gen = torch.Generator().manual_seed(0)
    n, c_in, c_out, h, w = 2, 3, 5, 4, 6
    x = torch.randn(n, c_in, h, w, generator=gen, dtype=torch.float64)
    weight = torch.randn(c_in, c_out, 2, 2, generator=gen, dtype=torch.float64)
    grad = torch.randn(n, c_out, 2 * h, 2 * w, generator=gen, dtype=torch.float64)

    def as_pairs(t):  # (N, C, 2H, 2W) -> (N, 2C, 2H, W): channels (dx, co)
        return t.permute(0, 2, 3, 1).reshape(n, 2 * h, w, 2 * c_out).permute(0, 3, 1, 2)

    # KRSC [ci][dy][0][(dx, co)] -> torch's (K, C, R, S) = (C_in, 2 C_out, 2, 1)
    f = weight.permute(0, 2, 3, 1).reshape(c_in, 2, 1, 2 * c_out).permute(0, 3, 1, 2)
    act_shape = (n, 2 * c_out, 2 * h, w)
    forward = torch.nn.grad.conv2d_input(act_shape, f, x, stride=(2, 1))
    torch.testing.assert_close(forward, as_pairs(conv_transpose2x2(x, weight)), rtol=1e-12, atol=1e-12)
    x_req, w_req = x.clone().requires_grad_(), weight.clone().requires_grad_()
    F.conv_transpose2d(x_req, w_req, stride=2).backward(grad)
    dgrad = F.conv2d(as_pairs(grad), f, stride=(2, 1))
    torch.testing.assert_close(dgrad, x_req.grad, rtol=1e-12, atol=1e-12)
    df = torch.nn.grad.conv2d_weight(as_pairs(grad), f.shape, x, stride=(2, 1))  # (C_in, 2 C_out, 2, 1)
    wgrad = df.permute(0, 2, 3, 1).reshape(c_in, 2, 2, c_out).permute(0, 3, 1, 2)
    torch.testing.assert_close(wgrad, w_req.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("weight_layout", ["contiguous", "channels_last"])
def test_bf16_channels_last_up_conv_backward_is_within_twice_stock_error(weight_layout):
    """bf16 channels_last up-convs take their backward as two GEMMs (csrc/ops/cpu/conv_transpose2x2.cpp,
    gemm_backward) where the bf16 oneDNN path serves: every gradient within twice stock's error of
    float64, grad_input channels_last, grad_weight in the weight's layout."""
    gen = torch.Generator().manual_seed(0)
    cl = torch.channels_last
    x64 = torch.randn(2, 64, 7, 9, generator=gen, dtype=torch.float64)
    w64 = torch.randn(64, 24, 2, 2, generator=gen, dtype=torch.float64) / 8
    b64 = torch.randn(24, generator=gen, dtype=torch.float64)
    wfmt = cl if weight_layout == "channels_last" else torch.contiguous_format
    x = x64.to(torch.bfloat16).contiguous(memory_format=cl).requires_grad_()
    w = w64.to(torch.bfloat16).contiguous(memory_format=wfmt).requires_grad_()
    b = b64.to(torch.bfloat16).requires_grad_()
    out = conv_transpose2x2(x, w, b)
    stock = F.conv_transpose2d(x, w, b, stride=2)
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(out, [x, w, b], grad.to(torch.bfloat16))
    want = torch.autograd.grad(stock, [x, w, b], grad.to(torch.bfloat16))
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    exact = torch.autograd.grad(F.conv_transpose2d(*leaves, stride=2), leaves, grad)
    for g_ours, g_stock, g_exact in zip(got, want, exact):
        assert g_ours.dtype == torch.bfloat16
        assert_low_precision(g_ours, g_stock, g_exact)
    assert got[0].is_contiguous(memory_format=cl)
    assert got[1].is_contiguous(memory_format=wfmt)
