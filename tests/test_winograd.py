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


CASES = [  # (N, C_in, C_out, H, W, padding): >= 192 channels (1 / C_in + 1 / C_out <= 1 / 96) and
    # batches so that forward and dgrad have >= 32 tiles (the selection rule, winograd.cpp)
    (3, 192, 192, 13, 17, 0),   # partial edge tiles in both directions
    (2, 208, 200, 9, 22, 1),    # "same"
    (8, 192, 256, 7, 7, 2),     # padding 2 (dgrad padding 0)
    (6, 200, 192, 6, 9, 2),     # small images, padding 2
    (32, 192, 192, 3, 3, 0),    # a single 1x1 output
    (1, 192, 192, 30, 600, 0),  # tile rows wider than a block: row segments
    (2, 256, 384, 20, 20, 1),   # several channel blocks
]


def _conv_inputs(n, c_in, c_out, h, w, gen, layout=torch.contiguous_format):
    x = torch.randn(n, c_in, h, w, generator=gen).contiguous(memory_format=layout)
    weight = torch.randn(c_out, c_in, 3, 3, generator=gen) * (2 / (9 * c_in)) ** 0.5
    bias = torch.randn(c_out, generator=gen) * 0.1
    return x, weight, bias


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_forward_and_dgrad_against_float64(case, layout):
    n, c_in, c_out, h, w, padding = case
    gen = torch.Generator().manual_seed(1)
    x, weight, bias = _conv_inputs(n, c_in, c_out, h, w, gen, layout)
    for op, ref in ((conv2d_relu, reference.conv2d_relu), (conv2d_bias, reference.conv2d_bias)):
        xs = [x.clone().requires_grad_(), x.double().requires_grad_(), x.clone().requires_grad_()]
        outs = [op(xs[0], weight, bias, padding), ref(xs[1], weight.double(), bias.double(), padding),
                ref(xs[2], weight, bias, padding)]
        assert outs[0].is_contiguous(memory_format=layout)
        _assert_accurate(outs[0], outs[2], outs[1], f"{op.__name__} forward")
        grad = torch.randn(outs[0].shape, generator=gen)
        # The same ReLU mask on every side (ours), so dgrad compares like with like.
        mask = (outs[0] > 0).double() if op is conv2d_relu else torch.ones(())
        gx = [torch.autograd.grad(o, xi, grad.to(o.dtype) * (mask.to(o.dtype) if i else 1))[0]
              for i, (o, xi) in enumerate(zip(outs, xs))]
        if op is conv2d_relu:  # the references' own masks differ at ReLU-boundary pixels: recompute unmasked
            gx[1] = torch.autograd.grad(F.conv2d(xs[1], weight.double(), bias.double(), padding=padding), xs[1],
                                        grad.double() * mask)[0]
            gx[2] = torch.autograd.grad(F.conv2d(xs[2], weight, bias, padding=padding), xs[2],
                                        grad * mask.float())[0]
        assert gx[0].is_contiguous(memory_format=layout)
        _assert_accurate(gx[0], gx[2], gx[1], f"{op.__name__} dgrad")
        # Winograd ran (its rounding differs from the direct path's somewhere).
        with unet_ext.backends.cpu.flags(allow_winograd=False):
            xd = x.clone().requires_grad_()
            direct = op(xd, weight, bias, padding)
            gd = torch.autograd.grad(direct, xd, grad)[0]
        assert not torch.equal(direct, outs[0]) and not torch.equal(gd, gx[0])


def test_concat_forward_and_dgrad_against_float64():
    gen = torch.Generator().manual_seed(2)
    for padding in (0, 1):
        skip = torch.randn(2, 192, 27, 29, generator=gen)
        up = torch.randn(2, 200, 18, 21, generator=gen)
        weight = torch.randn(208, 392, 3, 3, generator=gen) * (2 / (9 * 392)) ** 0.5
        bias = torch.randn(208, generator=gen) * 0.1
        leaves = [(skip.clone().requires_grad_(), up.clone().requires_grad_()),
                  (skip.double().requires_grad_(), up.double().requires_grad_()),
                  (skip.clone().requires_grad_(), up.clone().requires_grad_())]
        out = conv2d_relu_concat(*leaves[0], weight, bias, padding)
        exact = reference.conv2d_relu_concat(*leaves[1], weight.double(), bias.double(), padding)
        stock = reference.conv2d_relu_concat(*leaves[2], weight, bias, padding)
        _assert_accurate(out, stock, exact, "conv2d_relu_concat forward")
        grad = torch.randn(out.shape, generator=gen) * (out > 0)
        got = torch.autograd.grad(out, leaves[0], grad)
        want = torch.autograd.grad(
            F.conv2d(torch.cat([reference.crop_concat(leaves[1][0], leaves[1][1])], 1), weight.double(), padding=padding),
            leaves[1], grad.double())
        base = torch.autograd.grad(
            F.conv2d(reference.crop_concat(*leaves[2]), weight, padding=padding), leaves[2], grad)
        for name, a, b, c in zip(("grad_skip", "grad_up"), got, base, want):
            _assert_accurate(a, b, c, f"conv2d_relu_concat {name}")
        # Outside the crop window grad_skip is exactly zero.
        top, left = (27 - 18) // 2, (29 - 21) // 2
        window = torch.zeros_like(skip, dtype=torch.bool)
        window[:, :, top:top + 18, left:left + 21] = True
        assert (got[0][~window] == 0).all()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 3e38])
def test_non_finite_values_match_the_direct_path(value):
    """A NaN or infinity would spread over whole tiles (and 3e38 overflows in the transforms):
    such calls are recomputed by the direct path, forward and dgrad, so they match it exactly."""
    gen = torch.Generator().manual_seed(3)
    x, weight, bias = _conv_inputs(2, 192, 192, 24, 24, gen)
    x[0, 3, 5, 5] = value
    grad = torch.randn(2, 192, 24, 24, generator=gen)
    grad[1, 2, 7, 7] = value
    results = []
    for allow in (True, False):
        with unet_ext.backends.cpu.flags(allow_winograd=allow):
            xi = x.clone().requires_grad_()
            out = conv2d_relu(xi, weight, bias, 1)
            results.append((out, torch.autograd.grad(out, xi, grad)[0]))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_off_switch_takes_the_direct_path():
    gen = torch.Generator().manual_seed(4)
    x, weight, bias = _conv_inputs(2, 192, 192, 24, 24, gen)
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


def test_float64_never_uses_winograd():
    gen = torch.Generator().manual_seed(5)
    x, weight, bias = _conv_inputs(1, 32, 32, 10, 10, gen)
    x, weight, bias = x.double(), weight.double(), bias.double()
    torch.testing.assert_close(conv2d_relu(x, weight, bias, 1), reference.conv2d_relu(x, weight, bias, 1),
                               rtol=1e-10, atol=1e-12)


def test_filter_cache_sees_in_place_updates_and_new_weights():
    gen = torch.Generator().manual_seed(6)
    x, weight, bias = _conv_inputs(2, 192, 192, 16, 16, gen)
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


# (C_in, C_out) of every paper 3x3 layer that takes the Winograd path (encoder, then decoder,
# the first decoder conv of each level as conv2d_relu_concat), at a 20x20 input: the error per
# output depends on the channels (the sums' length), not on the image size.
PAPER_LAYERS = [(64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 512), (512, 512), (512, 1024),
                (1024, 1024), (1024, 512), (512, 512), (512, 256), (256, 256), (256, 128), (128, 128),
                (128, 64), (64, 64)]


@pytest.mark.parametrize("c_in,c_out", sorted(set(PAPER_LAYERS)), ids=lambda v: str(v))
def test_paper_layer_accuracy(c_in, c_out):
    """Forward, dgrad and wgrad of a paper layer: max error against float64 at most 8x stock
    float32's on the same input."""
    gen = torch.Generator().manual_seed(c_in + c_out)
    x, weight, bias = _conv_inputs(1, c_in, c_out, 20, 20, gen)
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
