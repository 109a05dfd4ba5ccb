"""Export of unet_ext models: torch.onnx.export (dynamo) writes standard ONNX ops only, with a
dynamic batch and size, and onnxruntime gives our outputs; torch.export round-trips through
save/load; `unet-ext export CKPT -o model.onnx`; the errors."""
import os

import numpy as np
import pytest
import torch

import unet_ext
from unet_ext.__main__ import main as cli

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

STANDARD = {"Conv", "Relu", "ConvTranspose", "MaxPool", "Slice", "Concat", "Shape", "Gather",
            "Sub", "Div", "Add", "Mul", "Constant", "Unsqueeze", "Squeeze", "Reshape", "Cast",
            "Identity", "Floor", "Range", "LogSoftmax", "NegativeLogLikelihoodLoss", "ReduceSum",
            "Equal", "Not", "Where", "Expand", "Neg", "Max", "Min", "ReduceMax", "Exp", "Log",
            "Less", "GatherElements", "Pad", "CastLike", "Greater", "Abs", "And"}


def _small_unet(padding="valid", depth=2, seed=0):
    torch.manual_seed(seed)
    return unet_ext.UNet(in_channels=1, num_classes=2, base_channels=4 if depth == 2 else 2, depth=depth,
                         padding=padding).eval()


def _run_onnx(path_or_bytes, x):
    session = ort.InferenceSession(path_or_bytes, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _op_types(model_proto):
    types = {(n.domain, n.op_type) for n in model_proto.graph.node}
    for function in model_proto.functions:
        types |= {(n.domain, n.op_type) for n in function.node}
    return types


# (padding, depth): three sizes each that the network takes, the first one traced.
SIZES = {("valid", 2): [44, 60, 76], ("same", 2): [32, 48, 64], ("valid", 4): [188, 204, 220]}


@pytest.mark.parametrize("padding,depth", list(SIZES))
def test_onnx_export_is_standard_ops_with_dynamic_batch_and_size(tmp_path, padding, depth):
    model = _small_unet(padding, depth)
    path = str(tmp_path / "unet.onnx")
    sizes = SIZES[padding, depth]
    example = unet_ext.export.example_input(model, sizes[0])
    unet_ext.export_onnx(model, path, example)
    proto = onnx.load(path)
    onnx.checker.check_model(proto)
    types = _op_types(proto)
    assert all(domain in ("", "ai.onnx") for domain, _ in types), types
    names = {t for _, t in types}
    assert {"Conv", "Relu", "ConvTranspose", "MaxPool", "Concat"} <= names
    assert names <= STANDARD, names - STANDARD
    for batch, size in ((1, sizes[0]), (3, sizes[1]), (2, sizes[2])):
        x = torch.randn(batch, 1, size, size)
        with torch.no_grad():
            expected = model(x).numpy()
        np.testing.assert_allclose(_run_onnx(path, x), expected, rtol=1e-4, atol=1e-4)


def test_plain_torch_onnx_export_works_after_import():
    """The issue's call, with no unet_ext helper: our ops decompose to standard ONNX ops."""
    model = _small_unet()
    x = torch.randn(1, 1, 44, 44)
    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    proto = program.model_proto
    assert all(domain in ("", "ai.onnx") for domain, _ in _op_types(proto))
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(_run_onnx(proto.SerializeToString(), x), expected, rtol=1e-4, atol=1e-4)


def test_onnx_export_of_the_loss():
    class WithLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _small_unet()

        def forward(self, x, target, weight_map):
            return unet_ext.weighted_cross_entropy(self.net(x), target, weight_map)

    model = WithLoss().eval()
    x = torch.randn(2, 1, 44, 44)
    target = torch.randint(0, 2, (2, 4, 4))
    weight_map = torch.rand(2, 4, 4)
    program = torch.onnx.export(model, (x, target, weight_map), dynamo=True, verbose=False)
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    inputs = dict(zip([i.name for i in session.get_inputs()], (x.numpy(), target.numpy(), weight_map.numpy())))
    with torch.no_grad():
        expected = model(x, target, weight_map).numpy()
    np.testing.assert_allclose(session.run(None, inputs)[0], expected, rtol=1e-4, atol=1e-5)


def test_torch_export_round_trips_through_save_and_load(tmp_path):
    model = _small_unet()
    example = torch.randn(2, 1, 44, 44)
    program = torch.export.export(model, (example,),
                                  dynamic_shapes=unet_ext.export.dynamic_shapes(model, example))
    path = str(tmp_path / "unet.pt2")
    torch.export.save(program, path)
    loaded = torch.export.load(path).module()
    x = torch.randn(3, 1, 60, 76)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)


def test_export_errors_are_one_clear_error(tmp_path):
    model = _small_unet()
    with pytest.raises(ValueError, match="training mode.*model.eval"):
        unet_ext.export_onnx(model.train(), str(tmp_path / "a.onnx"))
    model.eval()
    with pytest.raises(ValueError, match="export: 45 is not a valid input size.*use 44 or 48"):
        unet_ext.export_onnx(model, str(tmp_path / "a.onnx"), torch.randn(1, 1, 45, 45))
    with pytest.raises(ValueError, match=r"input must be \(N, 1, H, W\)"):
        unet_ext.export_onnx(model, str(tmp_path / "a.onnx"), torch.randn(1, 3, 44, 44))
    assert not os.listdir(tmp_path)


def test_cli_export_from_a_training_checkpoint(tmp_path, capsys):
    model = _small_unet()
    config = {"in_channels": 1, "num_classes": 2, "base_channels": 4, "depth": 2,
              "padding": "valid", "dropout": 0.0}
    checkpoint = str(tmp_path / "best.pt")
    torch.save({"model_config": config, "model": model.state_dict(), "epoch": 3}, checkpoint)
    out = str(tmp_path / "model.onnx")
    assert cli(["export", checkpoint, "-o", out, "--size", "44"]) == 0
    assert "wrote" in capsys.readouterr().out
    x = torch.randn(2, 1, 60, 60)
    with torch.no_grad():
        np.testing.assert_allclose(_run_onnx(out, x), model(x).numpy(), rtol=1e-4, atol=1e-4)
    before = os.path.getmtime(out)
    assert cli(["export", checkpoint, "-o", out, "--size", "44"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert os.path.getmtime(out) == before
    assert cli(["export", checkpoint, "-o", out, "--size", "44", "--overwrite"]) == 0
    assert cli(["export", checkpoint, "-o", str(tmp_path / "b.onnx"), "--size", "45"]) == 2
    assert "not a valid input size" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "model.onnx"]
    torch.save({"model": model.state_dict()}, str(tmp_path / "weights.pt"))
    assert cli(["export", str(tmp_path / "weights.pt"), "-o", str(tmp_path / "c.onnx")]) == 2
    assert "no model_config" in capsys.readouterr().err


def test_every_documented_submodule_is_reachable_after_import():
    import subprocess
    import sys
    names = ["data", "metrics", "tiling", "weight_map", "predict", "train", "nn", "ops", "reference",
             "export"]
    code = ("import unet_ext\n"
            f"for name in {names!r}:\n"
            "    getattr(unet_ext, name)\n"
            "print(unet_ext.reference.UNet(base_channels=2, depth=1).__class__.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "UNetBase"


def test_a_converted_model_exports_to_standard_onnx():
    """convert, then deploy: the converted forward (our ops, the BN fold) exports like the
    original and onnxruntime gives the original model's outputs."""
    from milesial_unet import MilesialUNet
    torch.manual_seed(0)
    model = MilesialUNet().eval()
    converted = unet_ext.convert(model, policy="always")
    x = torch.randn(2, 3, 32, 32)
    program = torch.onnx.export(converted, (x,), dynamo=True, verbose=False)
    names = {t for _, t in _op_types(program.model_proto)}
    assert {"Conv", "Relu", "ConvTranspose", "MaxPool", "Concat"} <= names <= STANDARD
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(_run_onnx(program.model_proto.SerializeToString(), x), expected,
                               rtol=1e-4, atol=1e-4)
