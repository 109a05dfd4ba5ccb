"""unet_ext.UNet against the stock-layer reference: the paper's configuration, state_dict
compatibility both ways, forward and every gradient (float64), valid and same padding, sizes."""
import io

import pytest
import torch

import unet_ext
from unet_ext import reference


def pair(seed=0, **config):
    torch.manual_seed(seed)
    ours = unet_ext.UNet(**config).double()
    stock = reference.UNet(**config).double()
    stock.load_state_dict(ours.state_dict())
    return ours, stock


def test_paper_configuration():
    model = unet_ext.UNet()
    assert sum(p.numel() for p in model.parameters()) == 31_030_658
    assert model.output_size(572) == 388
    stock = reference.UNet()
    ours_sd, stock_sd = model.state_dict(), stock.state_dict()
    assert list(ours_sd) == list(stock_sd)
    assert all(ours_sd[k].shape == stock_sd[k].shape for k in ours_sd)
    # Weights move both ways.
    stock.load_state_dict(ours_sd)
    model.load_state_dict(stock.state_dict())


def test_only_stock_layers_in_reference():
    allowed = (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.ReLU, torch.nn.MaxPool2d,
               torch.nn.Dropout, torch.nn.ModuleList)
    stock = reference.UNet(base_channels=4, depth=2)
    leaves = [m for m in stock.modules() if not list(m.children())]
    assert all(isinstance(m, allowed) for m in leaves), {type(m) for m in leaves}


def test_he_initialisation():
    model = unet_ext.UNet(base_channels=16, depth=2)
    w = model.encoder[1].conv1.weight
    assert abs(w.std().item() - (2 / (16 * 9)) ** 0.5) < 0.01
    assert torch.count_nonzero(model.encoder[1].conv1.bias) == 0


@pytest.mark.parametrize("padding,size", [("valid", 92), ("same", 33), ("same", 40)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_forward_and_gradients_match_reference(padding, size, layout):
    ours, stock = pair(base_channels=4, depth=3, padding=padding, in_channels=2, num_classes=3)
    x = torch.randn(2, 2, size, size + 4 * (padding == "same"), dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    out, expected = ours(x), stock(x)
    assert out.shape == expected.shape
    expected_hw = (ours.output_size(size), ours.output_size(x.shape[-1]))
    assert out.shape == (2, 3, *expected_hw)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, *ours.parameters()], grad)
    want = torch.autograd.grad(expected, [x, *stock.parameters()], grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)


def test_valid_sizes_and_errors():
    model = unet_ext.UNet(base_channels=2)
    assert model.valid_input_size(190) == 204 and model.valid_input_size(188) == 188
    assert unet_ext.output_size(188) == 4 and unet_ext.valid_input_size(1) == 188
    with pytest.raises(ValueError, match="190 is not a valid input size .*use 188 or 204"):
        model.output_size(190)
    with pytest.raises(ValueError, match="190 is not a valid input size"):
        model(torch.randn(1, 1, 190, 188))
    with pytest.raises(ValueError, match="input channels"):
        model(torch.randn(1, 3, 188, 188))
    same = unet_ext.UNet(base_channels=2, padding="same")
    assert same.output_size(17) == 17
    with pytest.raises(ValueError, match="too small"):
        same(torch.randn(1, 1, 8, 20))
    with pytest.raises(ValueError, match="padding must be"):
        unet_ext.UNet(padding="full")


def test_dropout_at_the_bottom_and_eval_is_deterministic():
    ours, _ = pair(base_channels=4, depth=2, dropout=0.5)
    x = torch.randn(1, 1, 44, 44, dtype=torch.float64)
    ours.train()
    assert not torch.equal(ours(x), ours(x))
    ours.eval()
    assert torch.equal(ours(x), ours(x))


def test_save_load_and_dtype_moves():
    ours, _ = pair(base_channels=4, depth=2)
    buffer = io.BytesIO()
    torch.save(ours.state_dict(), buffer)
    buffer.seek(0)
    again = unet_ext.UNet(base_channels=4, depth=2).double()
    again.load_state_dict(torch.load(buffer))
    x = torch.randn(1, 1, 44, 44, dtype=torch.float64)
    assert torch.equal(ours(x), again(x))
    as_bf16 = again.bfloat16()
    out = as_bf16(x.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_compile_fullgraph_training_step():
    ours, _ = pair(base_channels=4, depth=2)
    ours.float()
    x = torch.randn(2, 1, 44, 44)
    target = torch.randint(0, 2, (2, 4, 4))
    weight = torch.rand(2, 4, 4) + 0.5

    def step(model, x):
        return unet_ext.weighted_cross_entropy(model(x), target, weight)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(ours, x)
    loss.backward()
    got = [p.grad.clone() for p in ours.parameters()]
    ours.zero_grad()
    step(ours, x).backward()
    for g, p in zip(got, ours.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


def test_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = unet_ext.UNet(base_channels=4, depth=2).double()
    saved = unet_ext.UNet(base_channels=4, depth=2, checkpointing=True).double()
    saved.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, 44, 44, dtype=torch.float64)
    grads = []
    for model in (plain, saved):
        model(x).square().sum().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_channels_last_model_stays_channels_last(device):
    """A model converted with .to(memory_format=torch.channels_last) and fed its one-channel input
    (whose layout is ambiguous, so NCHW) runs every layer after the first in channels_last, as stock
    does: the first H200 lease found every layer in NCHW, each converting its activations to NHWC
    and back (55% of the UNet's time)."""
    torch.manual_seed(0)
    ours = unet_ext.UNet(base_channels=8).to(device).to(memory_format=torch.channels_last)
    stock = reference.UNet(base_channels=8).to(device).to(memory_format=torch.channels_last)
    stock.load_state_dict(ours.state_dict())
    x = torch.randn(2, 1, 188, 188, device=device).contiguous(memory_format=torch.channels_last)

    def layouts(model):
        """The layout of every conv module's output in call order, and the model's output's."""
        seen = []
        hooks = [m.register_forward_hook(lambda m, i, o: seen.append(
            "cl" if o.is_contiguous(memory_format=torch.channels_last) and not o.is_contiguous() else "nchw"))
            for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, unet_ext.nn.Conv2dReLU,
                                                       unet_ext.nn.Conv2dBias, unet_ext.nn.UpConv2x2))]
        with torch.no_grad():
            out = model(x)
        for h in hooks:
            h.remove()
        return seen, out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()

    (ours_layouts, ours_out_cl), (stock_layouts, stock_out_cl) = layouts(ours), layouts(stock)
    # Only the first conv (one-channel input and weight: ambiguous) gives NCHW, in both.
    assert stock_layouts[1:] == ["cl"] * (len(stock_layouts) - 1), stock_layouts
    assert len(ours_layouts) > 10 and ours_layouts[1:] == ["cl"] * (len(ours_layouts) - 1), ours_layouts
    assert ours_layouts[0] == stock_layouts[0] and ours_out_cl and stock_out_cl
