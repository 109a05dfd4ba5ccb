"""Shared test fixtures: devices, dtypes per device, layouts, and the low-precision rule."""
import pytest
import torch

import unet_ext  # noqa: F401  (registers the ops)

HAS_CUDA = torch.cuda.is_available() and unet_ext.build_info()["cuda_kernels"]

DEVICES = ["cpu"] + [pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(autouse=True)
def exact_float32():
    """float32 as float32: torch (and so our CUTLASS path, which follows
    torch.backends.cudnn.allow_tf32) would otherwise run float32 convolutions as TF32 on
    Ampere and later. Tests of the TF32 path turn it on themselves."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device and the CUDA kernels")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


def dtypes_for(device):
    """float64/float32 everywhere; bfloat16 on CPU; float16 and bfloat16 on CUDA."""
    if device == "cuda":
        return [torch.float64, torch.float32, torch.float16, torch.bfloat16]
    return [torch.float64, torch.float32, torch.bfloat16]


def device_dtype_params():
    params = []
    for device in ("cpu", "cuda"):
        marks = [pytest.mark.cuda] if device == "cuda" else []
        for dtype in dtypes_for(device):
            params.append(pytest.param(device, dtype, marks=marks, id=f"{device}-{str(dtype)[6:]}"))
    return params


def to_layout(x, layout):
    """contiguous | channels_last | strided (a non-contiguous view with the same values)."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        # Every other element of a twice-as-wide buffer along the last dim.
        wide = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        view = wide[..., ::2]
        assert x.numel() <= 1 or not view.is_contiguous()
        return view
    raise ValueError(layout)


LAYOUTS = ["contiguous", "channels_last", "strided"]

# Tight tolerances for the exact-arithmetic dtypes; 16-bit types use assert_low_precision.
TOLERANCES = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-6)}


def assert_low_precision(ours, stock, exact, slack=2.0, floor=1e-3):
    """flash-attention's rule: our error against a float64 reference is at most `slack` times
    the error of stock PyTorch in the same dtype (plus a small absolute floor)."""
    ours, stock, exact = ours.double(), stock.double(), exact.double()
    assert torch.equal(ours.isnan(), exact.isnan()), "NaN where the reference has none (or vice versa)"
    finite = ~exact.isnan()
    ours, stock, exact = ours[finite], stock[finite], exact[finite]
    if exact.numel() == 0:
        return
    ours_err = (ours - exact).abs().max().item()
    stock_err = (stock - exact).abs().max().item()
    scale = exact.abs().max().item()
    assert ours_err <= slack * stock_err + floor * max(scale, 1.0), (ours_err, stock_err)


def assert_usage_error(capsys, argv, *fragments):
    """The CLI refuses argv as a usage error: exit code 2 and one line on stderr holding every
    fragment (argparse's own errors exit from inside parse_args). Returns that line."""
    from unet_ext.__main__ import main as cli
    try:
        code = cli(argv)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    assert code == 2, captured.err
    err = captured.err.strip()
    assert len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err
