"""unet_ext.UNet on CUDA: forward and gradients against the stock-layer reference (float64 tight,
16-bit within twice stock PyTorch's error), autocast training (fp16 with a gradient scaler, bf16)
without NaN, channels_last, weights moving between CPU and CUDA, torch.compile, and tiled
prediction on the GPU equal to the CPU's."""
import pytest
import torch

import unet_ext
from unet_ext import reference

pytestmark = pytest.mark.cuda


def pair(dtype=torch.float64, **config):
    torch.manual_seed(0)
    ours = unet_ext.UNet(**config).to("cuda", dtype)
    stock = reference.UNet(**config).to("cuda", dtype)
    stock.load_state_dict(ours.state_dict())
    return ours, stock


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("padding,size", [("valid", 92), ("same", 40)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_float64_matches_reference(padding, size, channels_last):
    ours, stock = pair(base_channels=8, depth=3, padding=padding)
    x = torch.randn(2, 1, size, size, device="cuda", dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    out, expected = ours(x), stock(x)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, *ours.parameters()], grad)
    want = torch.autograd.grad(expected, [x, *stock.parameters()], grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16bit_forward_within_twice_stock_error(dtype):
    ours64, stock64 = pair(base_channels=16, depth=3)
    x = torch.randn(2, 1, 124, 124, device="cuda", dtype=torch.float64)
    ref = stock64(x)
    ours, stock = pair(dtype, base_channels=16, depth=3)
    err_ours = _err(ours(x.to(dtype)), ref)
    err_stock = _err(stock(x.to(dtype)), ref)
    assert err_ours <= 2 * err_stock + 1e-3 * ref.abs().max().item()


@pytest.mark.parametrize("amp", [torch.float16, torch.bfloat16], ids=str)
def test_autocast_training_is_stable(amp):
    """Several steps of autocast training on the paper's loss: finite losses and a decrease."""
    torch.manual_seed(0)
    model = unet_ext.UNet(base_channels=16, depth=3).cuda().to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(enabled=amp == torch.float16)
    x = torch.randn(4, 1, 124, 124, device="cuda").contiguous(memory_format=torch.channels_last)
    out_size = model.output_size(124)
    target = (x[:, 0, 30:30 + out_size, 30:30 + out_size] > 0).long()
    weight = torch.rand(4, out_size, out_size, device="cuda") + 0.5
    losses = []
    for _ in range(20):
        with torch.autocast("cuda", dtype=amp):
            logits = model(x)
        loss = unet_ext.weighted_cross_entropy(logits.float(), target, weight)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0]


def test_weights_move_between_cpu_and_cuda():
    torch.manual_seed(0)
    cpu = unet_ext.UNet(base_channels=4, depth=2).double()
    gpu = unet_ext.UNet(base_channels=4, depth=2).double().cuda()
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(1, 1, 60, 60, dtype=torch.float64)
    torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x), rtol=1e-9, atol=1e-9)
    assert all(p.is_cuda for p in gpu.parameters())
    back = gpu.cpu()
    assert not any(p.is_cuda for p in back.parameters())


def test_compile_fullgraph_on_cuda():
    torch.manual_seed(0)
    model = unet_ext.UNet(base_channels=4, depth=2).cuda()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 1, 60, 60, device="cuda")
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


def test_tiled_prediction_on_cuda_equals_cpu():
    torch.manual_seed(0)
    model = unet_ext.UNet(base_channels=4, depth=2).double()
    image = torch.rand(1, 1, 83, 97, dtype=torch.float64)
    on_cpu = unet_ext.predict_tiled(model, image, tile_size=60, progress=False)
    on_gpu = unet_ext.predict_tiled(model.cuda(), image, tile_size=60, progress=False)
    torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-9, atol=1e-9)
