"""The CPU Winograd F(4x4, 3x3) path of conv2d_relu / conv2d_bias / conv2d_relu_concat (float32):
its tile math on one float64 tile, forward and dgrad against a float64 reference (padding, partial
edge tiles, layouts, the concat's crop window, the ReLU mask), accuracy per paper layer against
stock float32, the allow_winograd switch and the filter cache's invalidation."""
import pytest
import torch
import torch.nn.functional as F

import unet_ext
from unet_ext import reference
from unet_ext.ops import conv2d_bias, conv2d_relu, conv2d_relu_concat

# Error against float64 at most this many times stock float32's (the issue's bar).
SLACK = 8.0


def _max_err(x, exact):
    return (x.double() - exact).abs().max().item()


def _assert_accurate(ours, stock, exact, what, slack=SLACK):
    """max |ours - exact| <= slack * max |stock - exact| (stock float32 on the same input), with a
    floor of a few float32 ulps of the output's scale for outputs stock gets exactly right."""
    floor = 4 * torch.finfo(torch.float32).eps * exact.abs().max().item()
    e_ours, e_stock = _max_err(ours, exact), _max_err(stock, exact)
    assert e_ours <= slack * e_stock + floor, f"{what}: max error {e_ours:.3g}, stock float32 {e_stock:.3g}"


@pytest.fixture(autouse=True)
def _winograd_on():
    with unet_ext.backends.cpu.flags(allow_winograd=True):
        yield


def test_tile_against_direct_convolution_float64():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        d = torch.randn(6, 6, dtype=torch.float64, generator=gen)
        g = torch.randn(3, 3, dtype=torch.float64, generator=gen)
        y = torch.ops.unet_ext._winograd_tile(d, g)
        exact = F.conv2d(d[None, None], g[None, None])[0, 0]
        torch.testing.assert_close(y, exact, rtol=1e-13, atol=1e-13)


def test_wgrad_tile_against_direct_correlation_float64():
    """F(3x3, 4x4): the 3x3 weight gradient of one tile, the correlation of the 6x6 input with the
    4x4 output gradient."""
    gen = torch.Generator().manual_seed(8)
    for _ in range(20):
        d = torch.randn(6, 6, dtype=torch.float64, generator=gen)
        dy = torch.randn(4, 4, dtype=torch.float64, generator=gen)
        dw = torch.ops.unet_ext._winograd_wgrad_tile(d, dy)
        exact = F.conv2d(d[None, None], dy[None, None])[0, 0]
        torch.testing.assert_close(dw, exact, rtol=1e-13, atol=1e-13)
    with pytest.raises(RuntimeError, match="grad must have shape \\[4, 4\\]"):
        torch.ops.unet_ext._winograd_wgrad_tile(torch.zeros(6, 6, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64))


def test_tile_errors_name_the_argument():
    with pytest.raises(RuntimeError, match="input must have shape \\[6, 6\\]"):
        torch.ops.unet_ext._winograd_tile(torch.zeros(5, 6, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="must be float64"):
        torch.ops.unet_ext._winograd_tile(torch.zeros(6, 6), torch.zeros(3, 3))


def test_switch():
    assert unet_ext.backends.cpu.allow_winograd
    with unet_ext.backends.cpu.flags(allow_winograd=False):
        assert not unet_ext.backends.cpu.allow_winograd
    assert unet_ext.backends.cpu.allow_winograd


CASES = [  # (N, C_in, C_out, H, W, padding): channels and batches so that forward, dgrad and wgrad
    # take Winograd (1 / C_in + 1 / C_out <= 1 / 16, and >= 128 tiles: winograd.cpp's selection rule)
    (11, 192, 192, 13, 17, 0),   # partial edge tiles in both directions
    (8, 208, 200, 9, 22, 1),     # "same"
    (32, 192, 256, 7, 7, 2),     # padding 2 (dgrad padding 0)
    (22, 200, 192, 6, 9, 2),     # small images, padding 2
    (128, 192, 192, 6, 6, 0),    # a single whole tile per image
    (1, 192, 192, 30, 600, 0),   # tile rows wider than a block: row segments
    (6, 256, 384, 20, 20, 1),    # several channel blocks
    (2, 64, 96, 17, 70, 1),      # mid channels, rows of 18 tiles (16 by shuffles, the rest one by one)
    (2, 64, 64, 11, 150, 0),     # 37 tiles a row, a partial last tile
    (2, 64, 64, 30, 42, 1),      # rows of 11 tiles (under a vector) in groups of 5 block rows, then 3
]


def _conv_inputs(n, c_in, c_out, h, w, gen, layout=torch.contiguous_format):
    x = torch.randn(n, c_in, h, w, generator=gen).contiguous(memory_format=layout)
    weight = torch.randn(c_out, c_in, 3, 3, generator=gen) * (2 / (9 * c_in)) ** 0.5
    bias = torch.randn(c_out, generator=gen) * 0.1
    return x, weight, bias


def _leaves(*tensors):
    """Three copies of each tensor as autograd leaves: ours (float32), the float64 reference, stock float32."""
    return [[t.clone().requires_grad_() for t in tensors], [t.double().requires_grad_() for t in tensors],
            [t.clone().requires_grad_() for t in tensors]]


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_forward_and_backward_against_float64(case, layout):
    """Forward, dgrad, wgrad and the bias gradient against float64 at 8x stock float32's error, and
    that each ran on Winograd (its rounding differs from the direct path's)."""
    n, c_in, c_out, h, w, padding = case
    gen = torch.Generator().manual_seed(1)
    x, weight, bias = _conv_inputs(n, c_in, c_out, h, w, gen, layout)
    for op in (conv2d_relu, conv2d_bias):
        leaves = _leaves(x, weight, bias)
        out = op(*leaves[0], padding)
        assert out.is_contiguous(memory_format=layout)
        exact, stock = (F.conv2d(*leaves[i], padding=padding) for i in (1, 2))
        if op is conv2d_relu:
            exact, stock = exact.relu(), stock.relu()
        _assert_accurate(out, stock, exact, f"{op.__name__} forward")
        # Our ReLU mask on every side (the references' own masks differ at boundary pixels), so the
        # gradients compare like with like: the references take it unmasked, pre-multiplied.
        grad = torch.randn(out.shape, generator=gen)
        mask = (out > 0).float() if op is conv2d_relu else torch.ones(())
        ours = torch.autograd.grad(out, leaves[0], grad)
        want, base = (torch.autograd.grad(F.conv2d(*leaves[i], padding=padding), leaves[i], (grad * mask).to(leaves[i][0].dtype))
                      for i in (1, 2))
        assert ours[0].is_contiguous(memory_format=layout)
        for name, a, b, c in zip(("dgrad", "wgrad", "bias grad"), ours, base, want):
            _assert_accurate(a, b, c, f"{op.__name__} {name}")
        with unet_ext.backends.cpu.flags(allow_winograd=False):
            leaves_d = _leaves(x, weight, bias)[0]
            direct_out = op(*leaves_d, padding)
            direct = torch.autograd.grad(direct_out, leaves_d, grad)
        assert not torch.equal(direct_out, out) and not torch.equal(direct[0], ours[0])
        assert not torch.equal(direct[1], ours[1])


def test_concat_forward_and_backward_against_float64():
    """conv2d_relu_concat on Winograd: the input transforms read the skip's crop window in place
    (forward and wgrad), dgrad writes it; grad_skip is zero outside the window."""
    gen = torch.Generator().manual_seed(2)
    for padding in (0, 1):
        skip = torch.randn(2, 192, 45, 47, generator=gen)
        up = torch.randn(2, 200, 36, 39, generator=gen)
        weight = torch.randn(208, 392, 3, 3, generator=gen) * (2 / (9 * 392)) ** 0.5
        bias = torch.randn(208, generator=gen) * 0.1
        leaves = _leaves(skip, up, weight, bias)
        out = conv2d_relu_concat(*leaves[0], padding)
        exact = reference.conv2d_relu_concat(*leaves[1], padding)
        stock = reference.conv2d_relu_concat(*leaves[2], padding)
        _assert_accurate(out, stock, exact, "conv2d_relu_concat forward")
        grad = torch.randn(out.shape, generator=gen) * (out > 0)
        got = torch.autograd.grad(out, leaves[0], grad)
        want, base = (torch.autograd.grad(F.conv2d(reference.crop_concat(*leaves[i][:2]), *leaves[i][2:], padding=padding),
                                          leaves[i], grad.to(leaves[i][0].dtype)) for i in (1, 2))
        for name, a, b, c in zip(("grad_skip", "grad_up", "grad_weight", "grad_bias"), got, base, want):
            _assert_accurate(a, b, c, f"conv2d_relu_concat {name}")
        # Outside the crop window grad_skip is exactly zero.
        top, left = (45 - 36) // 2, (47 - 39) // 2
        window = torch.zeros_like(skip, dtype=torch.bool)
        window[:, :, top:top + 36, left:left + 39] = True
        assert (got[0][~window] == 0).all()
        with unet_ext.backends.cpu.flags(allow_winograd=False):
            leaves_d = _leaves(skip, up, weight, bias)[0]
            direct_out = conv2d_relu_concat(*leaves_d, padding)
            direct = torch.autograd.grad(direct_out, leaves_d, grad)
        # forward, dgrad and wgrad ran on Winograd
        assert not torch.equal(direct_out, out) and not torch.equal(direct[1], got[1])
        assert not torch.equal(direct[2], got[2])


def test_wgrad_in_groups_of_blocks():
    """A gradient whose transform exceeds 64 MB (36 x tiles x C_out floats) runs in groups of tile
    blocks, the sums carried from one group to the next: the same accuracy."""
    gen = torch.Generator().manual_seed(10)
    x, weight, _ = _conv_inputs(1, 128, 256, 202, 202, gen)  # 2500 tiles x 256 channels: 92 MB
    out = F.conv2d(x, weight).relu()
    grad = torch.randn(out.shape, generator=gen)
    ours = torch.ops.unet_ext._conv2d_backward(grad, x, weight, out, 0, [False, True, True])
    with unet_ext.backends.cpu.flags(allow_winograd=False):
        direct = torch.ops.unet_ext._conv2d_backward(grad, x, weight, out, 0, [False, True, True])
    assert not torch.equal(ours[1], direct[1])
    masked = torch.ops.aten.threshold_backward(grad, out, 0)
    stock = torch.ops.aten.convolution_backward(masked, x, weight, [256], [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                                                [False, True, True])
    exact = torch.ops.aten.convolution_backward(masked.double(), x.double(), weight.double(), [256], [1, 1], [0, 0],
                                                [1, 1], False, [0, 0], 1, [False, True, True])
    _assert_accurate(ours[1], stock[1], exact[1], "grouped wgrad")
    _assert_accurate(ours[2], stock[2], exact[2], "grouped bias grad")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 3e38])
def test_non_finite_values_match_the_direct_path(value):
    """A NaN or infinity would spread over whole tiles (and 3e38 overflows in the transforms):
    such calls are recomputed by the direct path, forward, dgrad and wgrad, so every non-finite
    result matches it exactly. Either the input or the output gradient carries the value (wgrad
    reads both)."""
    gen = torch.Generator().manual_seed(3)
    x, weight, bias = _conv_inputs(2, 192, 192, 32, 32, gen)  # 128 tiles: forward and dgrad on Winograd too
    grad = torch.randn(2, 192, 32, 32, generator=gen)
    for where in ("input", "grad", "both"):
        xv, gv = x.clone(), grad.clone()
        if where != "grad":
            xv[0, 3, 5, 5] = value
        if where != "input":
            gv[1, 2, 7, 7] = value
        results = []
        for allow in (True, False):
            with unet_ext.backends.cpu.flags(allow_winograd=allow):
                xi, wi, bi = (t.clone().requires_grad_() for t in (xv, weight, bias))
                out = conv2d_relu(xi, wi, bi, 1)
                results.append((out, *torch.autograd.grad(out, (xi, wi, bi), gv)))
        for a, b in zip(*results):  # exact where the value reaches; results it does not reach may be Winograd's
            exact = not torch.isfinite(b).all()
            torch.testing.assert_close(a, b, rtol=0 if exact else 1e-4, atol=0 if exact else 1e-4, equal_nan=True)


def test_off_switch_takes_the_direct_path():
    gen = torch.Generator().manual_seed(4)
    x, weight, bias = _conv_inputs(4, 192, 192, 24, 24, gen)
    with unet_ext.backends.cpu.flags(allow_winograd=False):
        direct = conv2d_relu(x, weight, bias, 1)
    wino = conv2d_relu(x, weight, bias, 1)
    assert not torch.equal(direct, wino)  # two different algorithms
    torch.testing.assert_close(wino, direct, rtol=1e-4, atol=1e-5)


def test_padding_beyond_k_minus_1_stays_direct():
    gen = torch.Generator().manual_seed(7)
    x, weight, bias = _conv_inputs(8, 192, 192, 6, 9, gen)
    with torch.no_grad():
        wino = conv2d_relu(x, weight, bias, 3)
        with unet_ext.backends.cpu.flags(allow_winograd=False):
            direct = conv2d_relu(x, weight, bias, 3)
    assert torch.equal(wino, direct)


def test_mostly_empty_tiles_stay_direct():
    """1x1 outputs fill 1/16 of a tile: 4x the direct path's products (and wgrad's error was 9x
    stock's), so the direct path serves them, forward and wgrad (dgrad's 3x3 outputs fill 9/16)."""
    gen = torch.Generator().manual_seed(9)
    x, weight, bias = _conv_inputs(64, 192, 192, 3, 3, gen)
    grad = torch.randn(64, 192, 1, 1, generator=gen)
    results = []
    for allow in (True, False):
        with unet_ext.backends.cpu.flags(allow_winograd=allow):
            leaves = [t.clone().requires_grad_() for t in (weight, bias)]
            out = conv2d_relu(x, *leaves, 0)
            results.append((out, *torch.autograd.grad(out, leaves, grad)))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_float64_never_uses_winograd():
    """float64 takes the direct path, forward and backward (gradcheck stays exact): bit for bit the
    same with the switch on and off, on a layer that float32 runs on Winograd."""
    gen = torch.Generator().manual_seed(5)
    x, weight, bias = (t.double() for t in _conv_inputs(2, 192, 192, 24, 24, gen))
    grad = torch.randn(2, 192, 24, 24, generator=gen, dtype=torch.float64)
    results = []
    for allow in (True, False):
        with unet_ext.backends.cpu.flags(allow_winograd=allow):
            leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
            out = conv2d_relu(*leaves, 1)
            results.append((out, *torch.autograd.grad(out, leaves, grad)))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    torch.testing.assert_close(results[0][0], reference.conv2d_relu(x, weight, bias, 1), rtol=1e-10, atol=1e-12)


def test_filter_cache_sees_in_place_updates_and_new_weights(monkeypatch):
    """The cached filters (the brgemm path's: a weight version's later calls) follow in-place updates
    and new weights. The few-tiles path off: it would take the version's first call (128 tiles, its
    own filters, never cached); at -O3 its results equal the brgemm path's bit for bit, but an ASan
    build (-O1) rounds the two differently (2e-5 apart, both at Winograd's accuracy)."""
    monkeypatch.setenv("UNET_EXT_WINOGRAD_FEW_TILES", "0")
    gen = torch.Generator().manual_seed(6)
    x, weight, bias = _conv_inputs(8, 192, 192, 16, 16, gen)
    with torch.no_grad():
        first = conv2d_bias(x, weight, bias, 1)
        weight.mul_(2)  # bumps the version counter
        second = conv2d_bias(x, weight, bias, 1)
        torch.testing.assert_close(second - bias[:, None, None], 2 * (first - bias[:, None, None]), rtol=1e-4, atol=1e-5)
        for _ in range(3):  # new weights, possibly at a freed weight's address
            w = torch.randn(weight.shape, generator=gen) * (2 / (9 * 192)) ** 0.5
            torch.testing.assert_close(conv2d_bias(x, w, bias, 1), reference.conv2d_bias(x, w, bias, 1),
                                       rtol=1e-4, atol=1e-4)
            del w
    with torch.inference_mode():
        torch.testing.assert_close(conv2d_bias(x, weight, bias, 1), second)


def test_small_images_take_winograd_from_a_weight_versions_second_call(monkeypatch):
    """Below 128 tiles the brgemm path's filter transform costs more than Winograd saves when it is
    paid per call (training, dgrad); with the few-tiles path off, in inference a weight version's
    first call takes the direct path and the later ones Winograd on its cached filters."""
    monkeypatch.setenv("UNET_EXT_WINOGRAD_FEW_TILES", "0")
    gen = torch.Generator().manual_seed(11)
    x, weight, bias = _conv_inputs(2, 192, 192, 14, 14, gen)  # 2 x 9 tiles
    with torch.no_grad():
        with unet_ext.backends.cpu.flags(allow_winograd=False):
            direct = conv2d_relu(x, weight, bias, 0)
        assert torch.equal(conv2d_relu(x, weight, bias, 0), direct)
        second = conv2d_relu(x, weight, bias, 0)
        assert not torch.equal(second, direct)
        torch.testing.assert_close(second, direct, rtol=1e-4, atol=1e-5)
        weight.mul_(2)  # a new version: its first call is direct again
        with unet_ext.backends.cpu.flags(allow_winograd=False):
            direct = conv2d_relu(x, weight, bias, 0)
        assert torch.equal(conv2d_relu(x, weight, bias, 0), direct)
        assert not torch.equal(conv2d_relu(x, weight, bias, 0), direct)
    # Grad mode (the filters are never cached): always direct.
    assert torch.equal(conv2d_relu(x, weight, bias, 0), direct) and torch.equal(conv2d_relu(x, weight, bias, 0), direct)


# The few-tiles path (winograd_few.cpp: convolve_few; filters transformed per call, 16-400 tiles):
# (N, C_in, C_out, H, W, padding). Deep layers of a batch-2 base-32 model, and odd sizes with
# partial tiles and a last filter panel of 16 channels.
FEW_CASES = [
    (2, 512, 256, 24, 24, 0),   # 72 tiles forward and dgrad
    (2, 256, 256, 24, 24, 1),   # 72 tiles each way, every tile whole
    (2, 96, 80, 24, 24, 1),     # 80 output channels (filter panels of 32, 32, 16)
    (2, 80, 96, 24, 24, 1),
    (3, 64, 48, 16, 16, 1),     # 48 tiles each way
]


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", FEW_CASES, ids=lambda c: "x".join(map(str, c)))
def test_few_tiles_against_float64(case, layout):
    """Forward and dgrad of the few-tiles path (grad mode: filters per call) against float64 at 8x
    stock float32's error, and not the direct path's result."""
    n, c_in, c_out, h, w, padding = case
    gen = torch.Generator().manual_seed(21)
    x, weight, bias = _conv_inputs(n, c_in, c_out, h, w, gen, layout)
    leaves = _leaves(x, weight, bias)
    out = conv2d_relu(*leaves[0], padding)
    assert out.is_contiguous(memory_format=layout)
    exact, stock = (F.conv2d(*leaves[i], padding=padding).relu() for i in (1, 2))
    _assert_accurate(out, stock, exact, "forward")
    grad = torch.randn(out.shape, generator=gen) * (out > 0)
    ours = torch.autograd.grad(out, leaves[0][0], grad)[0]
    want, base = (torch.autograd.grad(F.conv2d(*leaves[i], padding=padding), leaves[i][0], grad.to(leaves[i][0].dtype))[0]
                  for i in (1, 2))
    assert ours.is_contiguous(memory_format=layout)
    _assert_accurate(ours, base, want, "dgrad")
    with unet_ext.backends.cpu.flags(allow_winograd=False):
        leaves_d = _leaves(x, weight, bias)[0]
        direct_out = conv2d_relu(*leaves_d, padding)
        direct = torch.autograd.grad(direct_out, leaves_d[0], grad)[0]
    assert not torch.equal(direct_out, out) and not torch.equal(direct, ours)


def test_few_tiles_concat_against_float64():
    """conv2d_relu_concat on the few-tiles path (2 x 6 x 6 tiles, padding 1): the input
    transform reads the skip's crop window, dgrad writes it; grad_skip is zero outside the window."""
    gen = torch.Generator().manual_seed(22)
    skip = torch.randn(2, 128, 28, 29, generator=gen)
    up = torch.randn(2, 128, 24, 24, generator=gen)
    weight = torch.randn(128, 256, 3, 3, generator=gen) * (2 / (9 * 256)) ** 0.5
    bias = torch.randn(128, generator=gen) * 0.1
    leaves = _leaves(skip, up, weight, bias)
    out = conv2d_relu_concat(*leaves[0], 1)
    exact = reference.conv2d_relu_concat(*leaves[1], 1)
    stock = reference.conv2d_relu_concat(*leaves[2], 1)
    _assert_accurate(out, stock, exact, "conv2d_relu_concat forward")
    grad = torch.randn(out.shape, generator=gen) * (out > 0)
    got = torch.autograd.grad(out, leaves[0][:2], grad)
    want, base = (torch.autograd.grad(F.conv2d(reference.crop_concat(*leaves[i][:2]), *leaves[i][2:], padding=1), leaves[i][:2],
                                      grad.to(leaves[i][0].dtype)) for i in (1, 2))
    for name, a, b, c in zip(("grad_skip", "grad_up"), got, base, want):
        _assert_accurate(a, b, c, f"conv2d_relu_concat {name}")
    window = torch.zeros_like(skip, dtype=torch.bool)
    window[:, :, 2:26, 2:26] = True
    assert (got[0][~window] == 0).all()
    with unet_ext.backends.cpu.flags(allow_winograd=False):
        leaves_d = _leaves(skip, up, weight, bias)[0]
        direct_out = conv2d_relu_concat(*leaves_d, 1)
        direct = torch.autograd.grad(direct_out, leaves_d[:2], grad)
    assert not torch.equal(direct_out, out) and not torch.equal(direct[1], got[1])


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", [(2, 64, 64, 74, 74, 0), (1, 96, 80, 13, 17, 1), (3, 64, 48, 9, 11, 2)],
                         ids=lambda c: "x".join(map(str, c)))
def test_few_tiles_forced_matches_the_brgemm_path(case, layout, monkeypatch):
    """UNET_EXT_WINOGRAD_FEW_TILES=all (read per call) forces the few-tiles path where its rule
    would not take it (648 tiles; partial tiles, padding 2): close to the brgemm path's Winograd
    (the same chunked sums), and against float64 at 8x stock float32's error, forward and dgrad."""
    n, c_in, c_out, h, w, padding = case
    gen = torch.Generator().manual_seed(23)
    x, weight, bias = _conv_inputs(n, c_in, c_out, h, w, gen, layout)
    results = {}
    monkeypatch.setenv("UNET_EXT_WINOGRAD_MIN_TILES", "1")
    for knob in ("all", "0"):
        monkeypatch.setenv("UNET_EXT_WINOGRAD_FEW_TILES", knob)
        leaves = _leaves(x, weight, bias)[0]
        out = conv2d_relu(*leaves, padding)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(24)) * (out > 0)
        results[knob] = (out, torch.autograd.grad(out, leaves[0], grad)[0], grad)
    for i in (0, 1):
        torch.testing.assert_close(results["all"][i], results["0"][i], rtol=1e-4, atol=1e-5)
    leaves = _leaves(x, weight, bias)
    exact, stock = (F.conv2d(*leaves[i], padding=padding).relu() for i in (1, 2))
    _assert_accurate(results["all"][0], stock, exact, "forced forward")
    grad = results["all"][2]
    want, base = (torch.autograd.grad(F.conv2d(*leaves[i], padding=padding), leaves[i][0], grad.to(leaves[i][0].dtype))[0]
                  for i in (1, 2))
    _assert_accurate(results["all"][1], base, want, "forced dgrad")


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_few_tiles_output_transform_without_relu(layout, monkeypatch):
    """The few-tiles path's output transform (output_transform_few: M^T read in place, vectors of
    output channels) on conv2d_bias (no ReLU: negative outputs kept): 208 output channels (parts of
    64, 64, 64 and 16), partial tiles in both directions, against float64; and a NaN input falls
    back to the direct path's result exactly."""
    monkeypatch.setenv("UNET_EXT_WINOGRAD_FEW_TILES", "all")
    monkeypatch.setenv("UNET_EXT_WINOGRAD_MIN_TILES", "1")
    gen = torch.Generator().manual_seed(25)
    x, weight, bias = _conv_inputs(2, 96, 208, 15, 19, gen, layout)  # 13 x 17 outputs: 4 x 5 tiles, partial
    leaves = _leaves(x, weight, bias)
    out = conv2d_bias(*leaves[0], 0)
    assert out.is_contiguous(memory_format=layout) and (out < 0).any()
    exact, stock = (F.conv2d(*leaves[i]) for i in (1, 2))
    _assert_accurate(out, stock, exact, "few-tiles forward without ReLU")
    with unet_ext.backends.cpu.flags(allow_winograd=False):
        direct = conv2d_bias(*_leaves(x, weight, bias)[0], 0)
    assert not torch.equal(direct, out)
    x[1, 5, 7, 7] = float("nan")
    with torch.no_grad():
        nan_out = conv2d_bias(x, weight, bias, 0)
        with unet_ext.backends.cpu.flags(allow_winograd=False):
            nan_direct = conv2d_bias(x, weight, bias, 0)
    torch.testing.assert_close(nan_out, nan_direct, rtol=0, atol=0, equal_nan=True)


# (C_in, C_out) of every paper 3x3 layer (encoder, then decoder, the first decoder conv of each
# level as conv2d_relu_concat), and the 32-channel levels of base-32 models, at a 48x48 input (144
# tiles: Winograd takes forward, dgrad and wgrad where the channels are enough): the forward's and
# dgrad's error per output depend on the channels (the sums' length), not on the image size;
# wgrad's sums run over the image (the benchmark's sizes: benchmarks/bench_winograd.py --wgrad
# prints the same ratios).
PAPER_LAYERS = [(64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 512), (512, 512), (512, 1024),
                (1024, 1024), (1024, 512), (512, 512), (512, 256), (256, 256), (256, 128), (128, 128),
                (128, 64), (64, 64), (32, 32), (32, 64), (64, 32)]


@pytest.mark.parametrize("c_in,c_out", sorted(set(PAPER_LAYERS)), ids=lambda v: str(v))
def test_paper_layer_accuracy(c_in, c_out):
    """Forward, dgrad and wgrad of a paper layer: max error against float64 at most 8x stock
    float32's on the same input."""
    gen = torch.Generator().manual_seed(c_in + c_out)
    x, weight, bias = _conv_inputs(1, c_in, c_out, 48, 48, gen)
    xs = [x.clone().requires_grad_(), x.double().requires_grad_(), x.clone().requires_grad_()]
    ws = [weight.clone().requires_grad_(), weight.double().requires_grad_(), weight.clone().requires_grad_()]
    out = conv2d_relu(xs[0], ws[0], bias, 0)
    grad = torch.randn(out.shape, generator=gen) * (out > 0)  # our mask on every side
    outs = [out, F.conv2d(xs[1], ws[1], bias.double()).relu(), F.conv2d(xs[2], ws[2], bias).relu()]
    _assert_accurate(outs[0], outs[2], outs[1], f"{c_in}->{c_out} forward")
    grads = [torch.autograd.grad(out, (xs[0], ws[0]), grad)]
    for i in (1, 2):
        pre = F.conv2d(xs[i], ws[i])
        grads.append(torch.autograd.grad(pre, (xs[i], ws[i]), grad.to(pre.dtype)))
    _assert_accurate(grads[0][0], grads[2][0], grads[1][0], f"{c_in}->{c_out} dgrad")
    _assert_accurate(grads[0][1], grads[2][1], grads[1][1], f"{c_in}->{c_out} wgrad")
    # Winograd ran where the selection rule's channels say (winograd.cpp): forward, dgrad and
    # wgrad from 1 / C_in + 1 / C_out <= 1 / 16.
    with unet_ext.backends.cpu.flags(allow_winograd=False):
        leaves = [t.clone().requires_grad_() for t in (x, weight)]
        direct = conv2d_relu(leaves[0], leaves[1], bias, 0)
        direct_grads = torch.autograd.grad(direct, leaves, grad)
    forward_rule = wgrad_rule = 16 * (c_in + c_out) <= c_in * c_out
    assert torch.equal(direct, out) != forward_rule and torch.equal(direct_grads[0], grads[0][0]) != forward_rule
    assert torch.equal(direct_grads[1], grads[0][1]) != wgrad_rule
