"""unet_ext.convert on U-Nets from other projects (segmentation_models_pytorch, MONAI) and one
written as milesial's Pytorch-UNet is: same outputs in eval, same gradients in training, same
state_dict keys, a report of what was replaced; the speed rule; the fall-backs."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import unet_ext
from milesial_unet import MilesialUNet
from unet_ext.convert import FusedConv2d, FusedConvTranspose2d, FusedMaxPool2d, _uncropped, ours_is_faster

TOL = dict(rtol=1e-4, atol=1e-4)


def _randomise_bn(model):
    """Running statistics and affine parameters away from 0/1, so folding them is tested."""
    generator = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(n, generator=generator) * 0.1)
    return model


def _check_eval(model, x, **kwargs):
    model = _randomise_bn(model).eval()
    converted, report = unet_ext.convert(model, report=True, policy="always", **kwargs)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), **TOL)
    assert list(converted.state_dict()) == list(model.state_dict())
    return converted, report


def _grads_of(model, x):
    model = copy.deepcopy(model)
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return {name: p.grad for name, p in model.named_parameters()}


def _assert_away_from_kinks(model, x):
    """A precondition on the test data: stock's own gradients stay within _check_training's
    tolerance when the input moves by 1e-7 relative (about float32 rounding). Near a kink (a ReLU
    input at 0 whose flip a training-mode BN over a few values per channel spreads over the
    channel) any path that rounds differently from stock lands on the other side: resnet18 at
    2x3x64x64 from seed 0 changed stock's conv1 gradient by 0.36% of the largest gradient under
    that perturbation, 360x the tolerance, and failed on our float32 Winograd path while passing
    on the direct one."""
    base = _grads_of(model, x)
    scale = max(float(g.abs().max()) for g in base.values())
    for k in range(2):
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(k))
        moved = _grads_of(model, x * (1 + 1e-7 * noise))
        for name, g in base.items():
            torch.testing.assert_close(moved[name], g, rtol=1e-3, atol=1e-5 * scale,
                                       msg=f"test data near a kink (stock itself moves): {name}")


def _check_training(model, x):
    """One forward/backward in training mode (BN on batch statistics) on both: same loss, same
    gradient for every parameter, same running statistics afterwards."""
    model = _randomise_bn(model).train()
    original = copy.deepcopy(model)
    _assert_away_from_kinks(original, x)
    converted = unet_ext.convert(model, policy="always")
    losses = []
    for m in (original, converted):
        out = m(x)
        loss = (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum()
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], **TOL)
    grads = dict(original.named_parameters())
    # A conv bias before a training-mode BN has a zero gradient in exact arithmetic: what both
    # compute there is rounding noise, so the absolute tolerance follows the largest gradient.
    scale = max(float(p.grad.abs().max()) for p in grads.values())
    for name, p in converted.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-3, atol=1e-5 * scale, msg=name)
    buffers = dict(original.named_buffers())
    for name, b in converted.named_buffers():
        torch.testing.assert_close(b, buffers[name], **TOL)


def test_milesial_unet_eval_matches_and_fuses_everything():
    torch.manual_seed(0)
    model = MilesialUNet()
    x = torch.randn(2, 3, 36, 44)  # odd levels: the pad path runs with non-zero padding
    converted, report = _check_eval(model, x)
    assert report.traced
    whats = [what for _, what in report.replaced]
    assert sum("BatchNorm2d" in w and "ReLU" in w for w in whats) == 10
    assert sum("conv2d_relu_concat" in w for w in whats) == 2
    assert sum("max_pool2x2" in w for w in whats) == 2
    assert sum("conv_transpose2x2" in w for w in whats) == 2
    assert "outc" in dict(report.replaced)  # the 1x1 head: conv2d_bias
    assert isinstance(converted.outc, FusedConv2d)
    assert type(converted.inc.double_conv[0]) is nn.Conv2d  # run by the rewritten forward
    assert isinstance(converted.ups[0].up, FusedConvTranspose2d)
    assert isinstance(converted.downs[0].maxpool_conv[0], FusedMaxPool2d)
    # The original is untouched (inplace=False) and both load each other's checkpoints.
    assert type(model.inc.double_conv[0]) is nn.Conv2d
    model.load_state_dict(converted.state_dict())
    converted.load_state_dict(model.state_dict())


def test_milesial_unet_training_gradients_match():
    torch.manual_seed(0)
    _check_training(MilesialUNet(), torch.randn(2, 3, 32, 32))


def test_eval_after_loading_new_weights_refolds():
    """The folded weights are cached per weight version: loading a checkpoint refolds."""
    torch.manual_seed(0)
    model = _randomise_bn(MilesialUNet()).eval()
    converted = unet_ext.convert(model, policy="always")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        converted(x)
        other = _randomise_bn(MilesialUNet()).eval()
        for m in other.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.mul_(3.0)
        converted.load_state_dict(other.state_dict())
        torch.testing.assert_close(converted(x), other(x), **TOL)


def _smp_unet():
    smp = pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(0)
    return smp.Unet("resnet18", encoder_weights=None, in_channels=3, classes=2,
                    decoder_channels=(64, 32, 16, 16, 8))


def test_smp_unet_eval_matches():
    model = _smp_unet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # smp's shape check may not trace: module level then
        converted, report = _check_eval(model, torch.randn(1, 3, 64, 64))
    whats = " ".join(w for _, w in report.replaced)
    assert "BatchNorm2d" in whats and "ReLU" in whats
    assert len(report.replaced) >= 20
    kept = dict(report.kept)
    assert "stride (2, 2)" in kept["encoder.conv1"]  # the 7x7 stride-2 stem stays stock


def test_smp_unet_training_gradients_match():
    model = _smp_unet()
    torch.manual_seed(1)  # seed 0's input sits at a kink (_assert_away_from_kinks); 1, 2 and 5 do not
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _check_training(model, torch.randn(2, 3, 64, 64))


def _monai_unet(**kwargs):
    monai_nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(0)
    return monai_nets.BasicUNet(spatial_dims=2, in_channels=1, out_channels=2,
                                features=(8, 8, 16, 16, 32, 8), **kwargs)


def test_monai_basic_unet_batchnorm_relu():
    model = _monai_unet(act="relu", norm="batch")
    x = torch.randn(2, 1, 48, 48)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted, report = _check_eval(model, x)
    whats = [w for _, w in report.replaced]
    assert sum("max_pool2x2" in w for w in whats) == 4
    assert sum("conv_transpose2x2" in w for w in whats) == 4
    assert sum("BatchNorm2d" in w and "ReLU" in w for w in whats) >= 18
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _check_training(_monai_unet(act="relu", norm="batch"), x)


def test_monai_basic_unet_defaults_keep_what_does_not_fit():
    """MONAI's default block is conv -> InstanceNorm -> LeakyReLU: only the convs (conv2d_bias),
    pools and up-convs are ours; the outputs still match."""
    model = _monai_unet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, report = _check_eval(model, torch.randn(1, 1, 32, 32))
    assert not any("ReLU" in w for _, w in report.replaced)
    assert any("max_pool2x2" in w for _, w in report.replaced)


def test_functional_relu_and_crop_concat_are_fused_when_the_model_traces():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 8, 3)
            self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
            self.merge = nn.Conv2d(12, 6, 3)

        def forward(self, x):
            skip = F.relu(self.conv(x))             # functional ReLU
            down = F.max_pool2d(skip, 2)            # functional pool
            up = self.up(down)
            top = (skip.shape[-2] - up.shape[-2]) // 2
            left = (skip.shape[-1] - up.shape[-1]) // 2
            crop = skip[:, :, top:top + up.shape[-2], left:left + up.shape[-1]]  # centre crop
            return torch.relu(self.merge(torch.cat([crop, up], 1)))

    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 4, 23, 23)
    converted, report = _check_eval(model, x)
    assert report.traced
    whats = [w for _, w in report.replaced]
    assert "F.max_pool2d(x, 2) -> max_pool2x2" in whats
    assert any(w.startswith("torch.cat") and w.endswith("conv2d_relu_concat") for w in whats)
    # The crop is recognised per call and the fused op reads the whole skip in place.
    skip, up = torch.randn(1, 8, 21, 21), torch.randn(1, 4, 10, 10)
    assert _uncropped(skip[:, :, 5:15, 5:15], skip, up) is skip
    assert _uncropped(skip[:, :, 4:14, 5:15], skip, up) is not skip
    assert _uncropped(skip[:, :4, 5:15, 5:15], skip, up) is not skip
    _check_training(Net(), torch.randn(2, 4, 23, 23))


def test_nothing_to_convert_is_a_report_not_an_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    converted, report = unet_ext.convert(model, report=True)
    assert report.nothing_converted
    assert "nothing to convert" in str(report)
    x = torch.randn(3, 4)
    torch.testing.assert_close(converted(x), model(x))


def test_untraceable_forward_falls_back_to_modules_with_a_warning(capsys):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
            self.pool = nn.MaxPool2d(2)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent: torch.fx cannot trace it
                x = -x
            return self.pool(self.block(x))

    torch.manual_seed(0)
    model = Branchy().eval()
    with pytest.warns(UserWarning, match="not rewritten with torch.fx"):
        converted, report = unet_ext.convert(model, report=True, verbose=True, policy="always")
    assert report.traced is False and "TraceError" in report.trace_error
    assert "module level only" in capsys.readouterr().out
    # The Sequential below still traces: its conv + ReLU is fused.
    assert ("block.0", "Conv2d + ReLU") in report.replaced
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(converted(x), model(x), **TOL)
    torch.testing.assert_close(converted(-x), model(-x), **TOL)


def test_forward_that_depends_on_the_mode_is_not_frozen():
    class ModeDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            y = F.relu(self.conv(x))
            return y * 2 if self.training else y

    model = ModeDependent()
    with pytest.warns(UserWarning, match="differs between training and eval"):
        converted = unet_ext.convert(model, policy="always")
    x = torch.randn(1, 3, 8, 8)
    for mode in (True, False):
        converted.train(mode), model.train(mode)
        torch.testing.assert_close(converted(x), model(x), **TOL)


def test_ineligible_layers_are_kept_with_the_reason():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Conv2d(4, 4, 3, dilation=2),
                          nn.MaxPool2d(3), nn.ConvTranspose2d(4, 4, 3, stride=2))
    _, report = unet_ext.convert(model, report=True)
    kept = dict(report.kept)
    assert "stride" in kept["0"] and "dilation" in kept["2"]
    assert "kernel 3" in kept["3"] and "kernel (3, 3)" in kept["4"]
    assert report.nothing_converted


def test_inplace_converts_the_given_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    assert unet_ext.convert(model, inplace=True) is model
    assert "_fused_conv" in model._unet_ext_code  # the Sequential's forward, rewritten


def test_speed_rule_keeps_stock_where_stock_is_faster():
    x = torch.randn(1, 64, 128, 128)
    assert ours_is_faster("conv2d_relu", x, 64, 64)
    assert not ours_is_faster("conv2d_relu", torch.randn(1, 128, 64, 64), 128, 256)   # 0.95-0.97x
    assert not ours_is_faster("conv2d_relu", torch.randn(1, 256, 64, 64), 256, 256)   # oneDNN both
    assert ours_is_faster("conv2d_relu", torch.randn(1, 64, 14, 14), 64, 64)          # stock: 0.12-37 ms
    assert not ours_is_faster("conv2d_relu", x.to(memory_format=torch.channels_last), 64, 64)
    assert not ours_is_faster("conv2d_relu", x.double(), 64, 64)
    assert ours_is_faster("max_pool2x2", x)
    assert not ours_is_faster("max_pool2x2", x.to(memory_format=torch.channels_last))
    assert ours_is_faster("conv_transpose2x2", x, 256, 128)
    assert not ours_is_faster("conv_transpose2x2", torch.randn(1, 512, 16, 16), 512, 256)


def test_auto_policy_matches_too():
    torch.manual_seed(0)
    model = _randomise_bn(MilesialUNet(base=16)).eval()
    converted = unet_ext.convert(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), **TOL)


def test_policy_is_checked():
    with pytest.raises(ValueError, match="policy"):
        unet_ext.convert(nn.Conv2d(1, 1, 1), policy="fast")


def test_a_converted_model_pickles_and_deep_copies():
    """torch.save(model) / torch.load and copy.deepcopy keep the rewritten forward."""
    import io
    torch.manual_seed(0)
    model = _randomise_bn(MilesialUNet()).eval()
    converted = unet_ext.convert(model, policy="always")
    buffer = io.BytesIO()
    torch.save(converted, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    copied = copy.deepcopy(loaded)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for m in (loaded, copied):
            assert "_fused_conv" in m._unet_ext_code
            torch.testing.assert_close(m(x), model(x), **TOL)


def test_functional_conv_relu_in_conv2d_subclasses_our_stock_reference_unet():
    """unet_ext.reference.UNet's forward does not trace (its input checks), and its convs are
    Conv2d subclasses whose forward is relu(F.conv2d(x, self.weight, self.bias)): each of
    those forwards is rewritten to conv2d_relu, the up-convs swapped."""
    torch.manual_seed(0)
    model = unet_ext.reference.UNet(base_channels=4, depth=3)
    x = torch.randn(2, 1, 124, 124)
    with pytest.warns(UserWarning, match="not rewritten with torch.fx"):
        _, report = _check_eval(model, x)
    whats = [w for _, w in report.replaced]
    assert whats.count("F.conv2d + ReLU (functional) -> conv2d_relu") == 14
    assert whats.count("ConvTranspose2d(2, stride 2) -> conv_transpose2x2") == 3
    assert dict(report.replaced)["encoder.0.conv1"] == "F.conv2d + ReLU (functional) -> conv2d_relu"
    assert not report.kept
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _check_training(unet_ext.reference.UNet(base_channels=4, depth=3), x)
