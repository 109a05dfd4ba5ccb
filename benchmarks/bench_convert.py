"""unet_ext.convert on U-Nets people already have: each model converted (policy "auto", the speed
rule) against its unconverted self, same weights, eval, batch 1, 512x512 (3 channels in), under
no_grad, interleaved: segmentation_models_pytorch.Unet (ResNet-34 encoder), MONAI's BasicUNet
(its defaults, and with BatchNorm + ReLU), and the milesial-style U-Net of the tests (base 64,
depth 4). Models whose package is missing are skipped. The per-layer rule itself is checked by
the "rule" cases: each conv shape these models run, ours vs stock (conv + ReLU, eval).
"""
import os
import sys

import torch
import torch.nn.functional as F

import unet_ext
from unet_ext.convert import ours_is_faster

try:
    from .harness import OURS, Case, run_cases
except ImportError:  # run as a script
    from harness import OURS, Case, run_cases

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))


def _models():
    """name -> constructor (random weights, eval mode); those whose package is missing left out."""
    from milesial_unet import MilesialUNet
    models = {"milesial-style UNet (base 64, depth 4)": lambda: MilesialUNet(3, 2, base=64, depth=4)}
    try:
        import segmentation_models_pytorch as smp
        models["smp.Unet resnet34"] = lambda: smp.Unet("resnet34", encoder_weights=None, in_channels=3, classes=2)
    except ImportError:
        pass
    try:
        from monai.networks.nets import BasicUNet
        models["monai BasicUNet (defaults)"] = lambda: BasicUNet(spatial_dims=2, in_channels=3, out_channels=2)
        models["monai BasicUNet (batch norm, ReLU)"] = lambda: BasicUNet(
            spatial_dims=2, in_channels=3, out_channels=2, act="relu", norm="batch")
    except ImportError:
        pass
    return models


def _model_case(name, build, size):
    def make():
        torch.manual_seed(0)
        stock = build().eval()
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # models that do not trace: module level
            ours = unet_ext.convert(stock)
        x = torch.randn(1, 3, size, size)

        def run(model):
            with torch.no_grad():
                return model(x)
        return {OURS: lambda: run(ours), "stock": lambda: run(stock)}
    return Case(op="convert eval", shape=f"{name} 1x3x{size}x{size}", dtype="float32",
                layout="contiguous", mode="forward", make=make, bytes_moved=0,
                tol=dict(rtol=1e-3, atol=1e-3))


# Conv shapes (C_in, C_out, H) that the models above run at 512x512, at the rule's edges.
RULE_SHAPES = [(3, 32, 512), (3, 64, 512), (32, 32, 512), (16, 16, 256), (64, 64, 128),
               (128, 128, 64), (128, 256, 64), (256, 256, 32), (64, 64, 12)]


def _rule_case(c_in, c_out, size):
    def make():
        torch.manual_seed(0)
        x = torch.randn(1, c_in, size + 2, size + 2)
        w = torch.randn(c_out, c_in, 3, 3) * 0.05
        b = torch.randn(c_out) * 0.1
        return {OURS: lambda: unet_ext.conv2d_relu(x, w, b), "stock": lambda: F.relu(F.conv2d(x, w, b))}
    x = torch.empty(1, c_in, size + 2, size + 2)
    verdict = "ours" if ours_is_faster("conv2d_relu", x, c_in, c_out) else "stock"
    return Case(op=f"convert rule (picks {verdict})", shape=f"conv2d_relu 1x{c_in}x{size + 2}->{c_out}",
                dtype="float32", layout="contiguous", mode="forward", make=make, bytes_moved=0,
                tol=dict(rtol=1e-3, atol=1e-3), flops=2 * c_in * c_out * 9 * size * size)


def cases(device, quick=False):
    if device != "cpu":
        return []  # the rule keeps CUDA on stock for now: nothing to compare
    size = 256 if quick else 512
    result = [_model_case(name, build, size) for name, build in _models().items()]
    if not quick:
        result += [_rule_case(*shape) for shape in RULE_SHAPES]
    return result


def run(device, quick=False, **timing):
    return run_cases(cases(device, quick), device, **timing)
