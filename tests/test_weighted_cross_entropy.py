"""weighted_cross_entropy against F.cross_entropy-based references: reductions, weights,
ignore_index, dtypes, layouts, shapes, stability, gradients, opcheck, compile, errors."""
import pytest
import torch
import torch.nn.functional as F

from unet_ext import reference
from unet_ext.ops import weighted_cross_entropy

from conftest import DEVICES, TOLERANCES, assert_low_precision, device_dtype_params, to_layout

REDUCTIONS = ["none", "mean", "sum"]


def make_inputs(shape, dtype, device, layout="contiguous", ignore_fraction=0.0, scale=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n, c, *spatial = shape
    logits = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale)
    target = torch.randint(0, c, (n, *spatial), generator=gen)
    if ignore_fraction:
        target[torch.rand(target.shape, generator=gen) < ignore_fraction] = -100
    weight_map = torch.rand((n, *spatial), generator=gen, dtype=torch.float64) * 10 + 0.5
    class_weight = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
    logits = logits.to(device=device, dtype=dtype)
    if len(shape) == 4:
        logits = to_layout(logits, layout)
    elif layout == "strided":
        logits = to_layout(logits, layout)
    return logits, target.to(device), weight_map.to(device), class_weight.to(device)


def check_against_reference(logits, target, weight_map, class_weight, reduction, ignore_index=-100):
    dtype = logits.dtype
    leaf = logits.detach().requires_grad_()
    ours = weighted_cross_entropy(leaf, target, weight_map, class_weight, ignore_index, reduction)
    assert ours.dtype == dtype
    grad_out = torch.rand_like(ours)
    ours_grad, = torch.autograd.grad(ours, leaf, grad_out)
    assert ours_grad.shape == logits.shape

    def run_reference(x, cast):
        x = x.detach().to(cast).requires_grad_()
        w = None if weight_map is None else weight_map.to(cast)
        cw = None if class_weight is None else class_weight.to(cast)
        out = reference.weighted_cross_entropy(x, target, w, cw, ignore_index, reduction)
        g, = torch.autograd.grad(out, x, grad_out.to(cast))
        return out, g

    exact, exact_grad = run_reference(logits, torch.float64)
    if dtype == torch.float64:
        torch.testing.assert_close(ours, exact, equal_nan=True, **TOLERANCES[dtype])
        torch.testing.assert_close(ours_grad, exact_grad, equal_nan=True, **TOLERANCES[dtype])
    elif ours.numel():
        # lse - x[t] cancels, so float32 error scales with |logits|: compare against stock
        # PyTorch's error in the same dtype (at most 2x), as for the 16-bit types.
        stock, stock_grad = run_reference(logits, dtype)
        floor = 1e-6 if dtype == torch.float32 else 1e-3
        assert_low_precision(ours, stock, exact, floor=floor)
        assert_low_precision(ours_grad, stock_grad, exact_grad, floor=floor)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("weighted", ["none", "map", "class", "both"])
def test_matches_reference_4d(device, dtype, reduction, layout, weighted):
    logits, target, weight_map, class_weight = make_inputs((3, 5, 7, 9), dtype, device, layout,
                                                           ignore_fraction=0.2)
    check_against_reference(logits, target, weight_map if weighted in ("map", "both") else None,
                            class_weight if weighted in ("class", "both") else None, reduction)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("shape", [(6, 3), (2, 4, 11), (2, 3, 3, 4, 5), (1, 2, 1, 1), (2, 1, 5, 5),
                                   (2, 300, 3, 7), (1, 2, 33, 1031), (0, 3, 4, 4)], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_shapes(device, dtype, shape, reduction):
    logits, target, weight_map, class_weight = make_inputs(shape, dtype, device, ignore_fraction=0.1)
    check_against_reference(logits, target, weight_map, None, reduction)
    check_against_reference(logits, target, None, class_weight, reduction)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (6, 3), (0, 3, 4, 4)], ids=str)
def test_opmath_loss_is_the_float32_loss_of_16bit_logits(device, dtype, reduction, layout, shape):
    """opmath_loss (what autocast asks for): the loss in the logits' opmath dtype, equal to the
    loss of the logits cast up first; the gradient in the logits' dtype, that of the cast-up
    logits rounded once (float32 and float64 logits: the plain op's results)."""
    logits, target, weight_map, class_weight = make_inputs(shape, dtype, device, layout, ignore_fraction=0.2)
    weight_map, class_weight = weight_map.float(), class_weight.float()
    opmath = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    leaf = logits.detach().requires_grad_()
    loss, lse, total = torch.ops.unet_ext._weighted_cross_entropy_forward(
        leaf, target, weight_map, class_weight, -100, reduction, opmath_loss=True)
    assert loss.dtype == lse.dtype == total.dtype == opmath
    up = leaf.detach().to(opmath).requires_grad_()
    want = weighted_cross_entropy(up, target, weight_map, class_weight, -100, reduction)
    tolerance = TOLERANCES[torch.float32 if opmath == torch.float32 else dtype]
    torch.testing.assert_close(loss, want, equal_nan=True, **tolerance)
    upstream = torch.rand_like(want)
    got, = torch.autograd.grad(loss, leaf, upstream)
    want_grad, = torch.autograd.grad(want, up, upstream)
    assert got.dtype == dtype and got.shape == logits.shape
    # One rounding of the same float32 value: equal, or one 16-bit step apart where the float32
    # values differ in their last bits across a rounding boundary.
    step = {torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}.get(dtype)
    if step is None:
        torch.testing.assert_close(got, want_grad, **tolerance)
    else:
        torch.testing.assert_close(got.to(opmath), want_grad, rtol=step, atol=1e-6)
    # Without opmath_loss the loss is the logits' dtype, as before.
    plain, _, _ = torch.ops.unet_ext._weighted_cross_entropy_forward(
        leaf.detach(), target, weight_map, class_weight, -100, reduction)
    assert plain.dtype == dtype
    torch.testing.assert_close(plain, loss.to(dtype), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_equals_f_cross_entropy_without_weight_map(device, reduction):
    logits, target, _, class_weight = make_inputs((4, 6, 10, 12), torch.float64, device)
    assert (target == 3).any()  # class 3 plays ignore_index
    ours = weighted_cross_entropy(logits, target, None, class_weight, ignore_index=3, reduction=reduction)
    stock = F.cross_entropy(logits, target, weight=class_weight, ignore_index=3, reduction=reduction)
    torch.testing.assert_close(ours, stock, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_stable_for_huge_logits(device, dtype):
    logits, target, weight_map, _ = make_inputs((2, 4, 9, 9), dtype, device, scale=1e4)
    check_against_reference(logits, target, weight_map, None, "mean")
    ours = weighted_cross_entropy(logits, target, weight_map)
    assert torch.isfinite(ours)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_paper_case_matches_unfused_mean(device):
    logits, target, weight_map, _ = make_inputs((2, 2, 64, 64), torch.float32, device)
    weight_map = weight_map.float()
    ours = weighted_cross_entropy(logits, target, weight_map)
    torch.testing.assert_close(ours, reference.weighted_cross_entropy_unfused(logits, target, weight_map))


def test_all_ignored_mean_is_nan_like_f_cross_entropy():
    logits = torch.randn(2, 3, 4, 4)
    target = torch.full((2, 4, 4), -100)
    assert torch.isnan(weighted_cross_entropy(logits, target))
    assert torch.isnan(F.cross_entropy(logits, target))
    assert weighted_cross_entropy(logits, target, reduction="sum") == 0


def test_nan_logits_propagate():
    logits = torch.randn(1, 2, 3, 3)
    logits[0, 1, 1, 1] = float("nan")
    target = torch.zeros(1, 3, 3, dtype=torch.long)
    loss = weighted_cross_entropy(logits, target, reduction="none")
    assert torch.isnan(loss[0, 1, 1]) and torch.isfinite(loss[0, 0, 0])


def test_other_integer_targets_are_accepted():
    logits, target, weight_map, _ = make_inputs((2, 3, 5, 5), torch.float64, "cpu")
    expected = weighted_cross_entropy(logits, target, weight_map)
    torch.testing.assert_close(weighted_cross_entropy(logits, target.to(torch.uint8), weight_map), expected)
    torch.testing.assert_close(weighted_cross_entropy(logits, target.int(), weight_map), expected)


def test_gradcheck_logits_and_weight_map():
    for reduction in REDUCTIONS:
        logits, target, weight_map, class_weight = make_inputs((2, 3, 4, 5), torch.float64, "cpu",
                                                               ignore_fraction=0.2)
        logits.requires_grad_()
        weight_map.requires_grad_()
        assert torch.autograd.gradcheck(
            lambda x, w: weighted_cross_entropy(x, target, w, class_weight, reduction=reduction),
            (logits, weight_map))
        cl = logits.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        assert torch.autograd.gradcheck(
            lambda x: weighted_cross_entropy(x, target, weight_map.detach(), reduction=reduction), (cl,))


def test_class_weight_grad_is_refused():
    logits, target, _, class_weight = make_inputs((1, 3, 4, 4), torch.float64, "cpu")
    loss = weighted_cross_entropy(logits.requires_grad_(), target, None, class_weight.requires_grad_())
    with pytest.raises(NotImplementedError, match="class_weight"):
        loss.backward()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(device, reduction, layout):
    logits, target, weight_map, class_weight = make_inputs((2, 3, 5, 6), torch.float32, device, layout,
                                                           ignore_fraction=0.2)
    logits.requires_grad_()
    for args in [(logits, target, weight_map, None, -100, reduction),
                 (logits, target, None, class_weight, -100, reduction)]:
        torch.library.opcheck(torch.ops.unet_ext._weighted_cross_entropy_forward.default, args)
        torch.library.opcheck(torch.ops.unet_ext.weighted_cross_entropy.default, args)
    # The autocast form: 16-bit logits, float32 loss.
    half = logits.detach().to(torch.bfloat16).requires_grad_()
    torch.library.opcheck(torch.ops.unet_ext._weighted_cross_entropy_forward.default,
                          (half, target, weight_map.float(), None, -100, reduction, True))
    loss, lse, total = torch.ops.unet_ext._weighted_cross_entropy_forward(
        logits.detach(), target, weight_map, class_weight, -100, reduction)
    torch.library.opcheck(torch.ops.unet_ext._weighted_cross_entropy_backward.default,
                          (torch.rand_like(loss), logits.detach(), target, weight_map, class_weight, lse,
                           total, -100, reduction))


def test_compile_fullgraph():
    logits, target, weight_map, _ = make_inputs((2, 2, 16, 16), torch.float32, "cpu")
    logits.requires_grad_()

    def step(x, t, w):
        return weighted_cross_entropy(x * 1.5, t, w)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(logits, target, weight_map)
    loss.backward()
    expected = step(logits, target, weight_map)
    expected_grad, = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(logits.grad, expected_grad)


@pytest.mark.parametrize("kwargs,message", [
    (dict(target=torch.full((2, 4, 4), 3)), "target value 3 is out of range for 3 classes"),
    (dict(target=torch.full((2, 4, 4), -1)), "target value -1 is out of range"),
    (dict(target=torch.zeros(2, 4, 4)), "target must hold class indices"),
    (dict(target=torch.zeros(2, 4, 5, dtype=torch.long)), r"target must have shape \[2, 4, 4\]"),
    (dict(weight_map=torch.ones(2, 4, 3)), "weight_map must have target's shape"),
    (dict(class_weight=torch.ones(4)), r"class_weight must have shape \[3\]"),
    (dict(logits=torch.randn(3)), "logits must have shape"),
])
def test_bad_input_raises(kwargs, message):
    args = dict(logits=torch.randn(2, 3, 4, 4), target=torch.zeros(2, 4, 4, dtype=torch.long))
    args.update(kwargs)
    with pytest.raises(RuntimeError, match=message):
        weighted_cross_entropy(**args)


def test_bad_reduction_raises_value_error():
    with pytest.raises(ValueError, match="reduction must be one of"):
        weighted_cross_entropy(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), reduction="avg")


@pytest.mark.cuda
def test_cuda_out_of_range_target_is_a_device_error():
    # Run in a subprocess: a device-side assert poisons the CUDA context of the process.
    import subprocess
    import sys
    code = ("import torch, unet_ext\n"
            "x = torch.randn(2, 3, 4, 4, device='cuda'); t = torch.full((2, 4, 4), 7, device='cuda')\n"
            "unet_ext.weighted_cross_entropy(x, t).item()\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0 and "assert" in (result.stderr + result.stdout).lower()


@pytest.mark.cuda
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cuda_reduction_is_deterministic(reduction):
    # ~150K pixels: hundreds of blocks of partial sums, added in a fixed order.
    logits, target, weight_map, class_weight = make_inputs((2, 5, 250, 300), torch.float32, "cuda",
                                                           ignore_fraction=0.1)
    runs = [torch.ops.unet_ext._weighted_cross_entropy_forward(logits, target, weight_map, class_weight,
                                                               -100, reduction) for _ in range(3)]
    for loss, _, total in runs[1:]:
        assert torch.equal(loss, runs[0][0]) and torch.equal(total, runs[0][2])
    cpu_loss, _, cpu_total = torch.ops.unet_ext._weighted_cross_entropy_forward(
        logits.cpu(), target.cpu(), weight_map.cpu(), class_weight.cpu(), -100, reduction)
    torch.testing.assert_close(runs[0][0].cpu(), cpu_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(runs[0][2].cpu(), cpu_total, rtol=1e-6, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cuda_non_finite_logits_match_cpu(dtype, reduction):
    # NaN / +inf / -inf logits on counted and on ignored pixels: the NaN pattern of loss,
    # logsumexp and grad must be the CPU kernel's (ignored pixels: loss exactly 0, grad NaN
    # only where a logit is NaN).
    logits, target, weight_map, class_weight = make_inputs((2, 4, 6, 7), dtype, "cpu", ignore_fraction=0.3)
    logits[0, 1, 0, :] = float("nan")
    logits[0, 2, 1, :] = float("inf")
    logits[1, :, 2, :] = float("-inf")
    logits[1, 3, 3, :] = float("-inf")
    grad = torch.rand(target.shape if reduction == "none" else (), dtype=dtype)
    results = {}
    for device in ("cpu", "cuda"):
        args = [t.to(device) for t in (logits, target, weight_map, class_weight)]
        loss, lse, total = torch.ops.unet_ext._weighted_cross_entropy_forward(*args, -100, reduction)
        grad_logits = torch.ops.unet_ext._weighted_cross_entropy_backward(
            grad.to(device), *args[:2], args[2], args[3], lse, total, -100, reduction)
        results[device] = [t.cpu() for t in (loss, lse, total, grad_logits)]
    for cpu, cuda in zip(results["cpu"], results["cuda"]):
        torch.testing.assert_close(cuda, cpu, equal_nan=True, **TOLERANCES[dtype])
    if reduction == "none":
        ignored = target == -100
        assert results["cuda"][0].isnan().any() and (results["cuda"][0][ignored] == 0).all()


@pytest.mark.cuda
@pytest.mark.parametrize("which", ["forward", "backward"])
def test_cuda_out_of_range_target_asserts(which):
    # Subprocess: a device-side assert poisons the CUDA context of the process.
    import subprocess
    import sys
    code = ("import torch, unet_ext\n"
            "x = torch.randn(2, 3, 4, 4, device='cuda'); t = torch.zeros(2, 4, 4, dtype=torch.long, device='cuda')\n"
            "loss, lse, total = torch.ops.unet_ext._weighted_cross_entropy_forward(x, t, None, None, -100, 'mean')\n"
            "t[1, 2, 3] = 3 if %r == 'forward' else -1\n"
            "if %r == 'forward':\n"
            "    torch.ops.unet_ext._weighted_cross_entropy_forward(x, t, None, None, -100, 'mean')\n"
            "else:\n"
            "    torch.ops.unet_ext._weighted_cross_entropy_backward(torch.ones((), device='cuda'), x, t, None, None, lse, total, -100, 'mean')\n"
            "torch.cuda.synchronize()\n") % (which, which)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    output = (result.stderr + result.stdout).lower()
    assert result.returncode != 0 and "assert" in output, output[-2000:]


@pytest.mark.cuda
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cuda_does_not_synchronize(reduction):
    logits, target, weight_map, class_weight = make_inputs((2, 3, 16, 16), torch.float32, "cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, lse, total = torch.ops.unet_ext._weighted_cross_entropy_forward(
            logits, target, weight_map, class_weight, -100, reduction)
        torch.ops.unet_ext._weighted_cross_entropy_backward(
            torch.ones_like(loss), logits, target, weight_map, class_weight, lse, total, -100, reduction)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("weighted", [False, True])
def test_ignored_pixels_get_a_zero_gradient_like_stock(device, dtype, weighted):
    """Every pixel ignored: 'mean' is 0/0 = NaN in the forward (as stock), but the gradient of an
    ignored pixel is 0, not 0 * inf = NaN, which would poison the weights (found by the
    hypothesis tests). Likewise a non-finite upstream gradient at an ignored pixel ('none')."""
    logits = torch.randn(2, 3, 5, 4, dtype=dtype, device=device)
    target = torch.full((2, 5, 4), -100, device=device)
    weight_map = torch.rand(2, 5, 4, dtype=dtype, device=device) if weighted else None
    ours_in, ref_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = weighted_cross_entropy(ours_in, target, weight_map)
    ref = reference.weighted_cross_entropy(ref_in, target, weight_map)
    assert ours.isnan() and ref.isnan()
    ours.backward()
    ref.backward()
    assert torch.equal(ref_in.grad, torch.zeros_like(logits))
    assert torch.equal(ours_in.grad, ref_in.grad)
    # reduction='none', half the pixels ignored, inf/NaN upstream gradient on the ignored ones.
    target = torch.randint(0, 3, (2, 5, 4), device=device)
    target[:, ::2] = -100
    upstream = torch.rand(2, 5, 4, dtype=dtype, device=device)
    upstream[:, ::2] = float("inf")
    upstream[0, 0, 0] = float("nan")
    ours_in, ref_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    weighted_cross_entropy(ours_in, target, weight_map, reduction="none").backward(upstream)
    reference.weighted_cross_entropy(ref_in, target, weight_map, reduction="none").backward(upstream)
    torch.testing.assert_close(ours_in.grad, ref_in.grad, **TOLERANCES[dtype])
