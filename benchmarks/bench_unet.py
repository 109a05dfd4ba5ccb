"""Whole-model benchmark: unet_ext.UNet against the stock-layer reference (unet_ext.reference.UNet)
with the same weights, eager (and torch.compile of the reference on CUDA), interleaved. Training
step = forward, weighted loss, backward, SGD step; inference = forward under no_grad. CPU: base 32
at 316x316 batch 2 (training) and the paper's network at 572x572 batch 1 (inference), float32 and
bf16 autocast; CUDA: the paper's network at batch 8 (and 1), 572x572 valid and 512x512 same
padding, float32, bf16 (models and input cast) and bf16 autocast, channels_last. Under autocast both sides run the whole step in it (each op by its autocast policy:
convolutions in bf16, the loss in float32 from the bf16 logits), so the rows compare like with
like; the CPU autocast rows also time our float32 step ("unet_ext float32") in the same
interleaved run, so "bf16 beats our own float32" is measured, not inferred. TFLOP/s count the
convolutions (300.9 GFLOP per 572 tile forward for the paper's net; training counts 3x).
"""
import torch

import unet_ext
from unet_ext import reference

try:
    from .harness import OURS, Case, run_cases
except ImportError:  # run as a script
    from harness import OURS, Case, run_cases


def forward_flops(model, size):
    """Multiply-adds x 2 of every convolution of `model` for a size x size input (batch 1)."""
    flops, depth, same = 0, model.depth, model.padding == "same"
    sizes = []
    s = size
    for level, block in enumerate(model.encoder):
        for conv in (block.conv1, block.conv2):
            s = s if same else s - 2
            flops += 2 * conv.weight.numel() * s * s
        sizes.append(s)
        if level < depth:
            s //= 2
    for block in model.decoder:
        flops += 2 * block.up.weight.numel() * s * s  # each input pixel: C_in x C_out x 4
        s *= 2
        for conv in (block.conv1, block.conv2):
            s = s if same else s - 2
            flops += 2 * conv.weight.numel() * s * s
    flops += 2 * model.head.weight.numel() * s * s
    return flops


OURS_FLOAT32 = OURS + " float32"


def _case(device, base, size, batch, train, dtype, autocast, with_compile, with_float32=False,
          padding="valid", cast=False):
    """cast: the models and the input in `dtype` (no autocast); autocast: float32 models under
    torch.autocast(dtype); neither: float32."""
    def make():
        torch.manual_seed(0)
        ours = unet_ext.UNet(base_channels=base, padding=padding).to(device)
        stock = reference.UNet(base_channels=base, padding=padding).to(device)
        stock.load_state_dict(ours.state_dict())
        if cast:
            ours, stock = ours.to(dtype), stock.to(dtype)
        fmt = torch.channels_last if device == "cuda" else torch.contiguous_format
        models = {OURS: ours.to(memory_format=fmt), "stock": stock.to(memory_format=fmt)}
        if with_compile:
            models["compile(stock)"] = torch.compile(stock)
        if with_float32:  # our own float32 step, the same model outside autocast
            models[OURS_FLOAT32] = ours
        x = torch.randn(batch, 1, size, size, device=device, dtype=dtype if cast else torch.float32)
        x = x.contiguous(memory_format=fmt)
        out = ours.output_size(size)
        target = torch.randint(0, 2, (batch, out, out), device=device)
        weight = torch.rand(batch, out, out, device=device) + 0.5
        losses = {OURS: unet_ext.weighted_cross_entropy, OURS_FLOAT32: unet_ext.weighted_cross_entropy}
        optimizers = {name: torch.optim.SGD(m.parameters(), lr=1e-6, momentum=0.99) for name, m in models.items()}

        def run(name):
            model = models[name]
            loss_fn = losses.get(name, reference.weighted_cross_entropy_unfused)
            with torch.autocast(device, dtype=dtype, enabled=autocast and name != OURS_FLOAT32):
                if not train:
                    with torch.no_grad():
                        return model(x).float()
                # The loss's own autocast policy takes the logits as they come (float32 math).
                loss = loss_fn(model(x), target, weight)
            optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[name].step()
            return loss.detach()
        return {name: (lambda name=name: run(name)) for name in models}

    probe = unet_ext.UNet(base_channels=base, padding=padding)
    flops = forward_flops(probe, size) * batch * (3 if train else 1)
    label = f"UNet base {base} {size}x{size} b{batch}" + (" same" if padding == "same" else "")
    # Training steps move the weights: outputs agree only loosely (and each impl steps its own copy).
    if train:
        tol = dict(rtol=0.1, atol=0.1)
    elif autocast or cast:  # bf16 through 23 layers: ~1e-2 of the output's norm
        tol = dict(rel_norm=5e-2)
    elif device == "cuda" and torch.backends.cudnn.allow_tf32:  # TF32 on both sides (stock's default)
        tol = dict(rel_norm=1e-2)
    else:
        tol = dict(rtol=1e-3, atol=1e-3)
    return Case(op="unet " + ("train step" if train else "inference"), shape=label,
                dtype=("bf16 autocast" if autocast else str(dtype)[6:] if cast else "float32"),
                layout="channels_last" if device == "cuda" else "contiguous",
                mode="train" if train else "forward", make=make, bytes_moved=0, tol=tol,
                flops=flops, no_memory=("compile(stock)",))


def cases(device, quick=False):
    if device == "cpu":
        result = []
        for autocast in (False, True):
            result.append(_case("cpu", 32, 316, 2, True, torch.bfloat16, autocast, False, autocast))
            if not quick:
                result.append(_case("cpu", 64, 572, 1, False, torch.bfloat16, autocast, False, autocast))
        return result
    # CUDA: the paper's network at batch 8 (572 valid; 512 same padding), float32, bf16 (models
    # and input cast) and bf16 autocast, channels_last; the full run adds batch 1 and compile.
    result = []
    for batch in ((8,) if quick else (1, 8)):
        for size, padding in ((572, "valid"), (512, "same")):
            for precision in ("float32", "bfloat16", "autocast"):
                for train in (True, False):
                    result.append(_case("cuda", 64, size, batch, train, torch.bfloat16, precision == "autocast",
                                        not quick, padding=padding, cast=precision == "bfloat16"))
    return result


def run(device, quick=False, **timing):
    return run_cases(cases(device, quick), device, **timing)
