"""weighted_cross_entropy: the U-Net paper's pixel-wise weighted softmax cross-entropy, fused.

The public op is composite over ``_weighted_cross_entropy_forward`` (which also returns the
per-pixel logsumexp and the mean's denominator); autograd is registered on that forward op.
Under autocast the public op calls the forward op with ``opmath_loss=True``: 16-bit logits are
read as they are and the loss comes out in float32 (csrc/ops/autocast/weighted_cross_entropy.cpp).
"""
import math
from typing import Optional

import torch

__all__ = ["weighted_cross_entropy"]

_REDUCTIONS = ("none", "mean", "sum")


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                           weight_map: Optional[torch.Tensor] = None,
                           class_weight: Optional[torch.Tensor] = None,
                           ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """Pixel-wise weighted cross-entropy, ``E = sum_x w(x) * -log softmax(logits)(x)[target(x)]``.

    logits: (N, C) or (N, C, d1, ..., dk), any float dtype and layout (channels_last is read in
    place). target: (N, d1, ..., dk) class indices. weight_map: target's shape (the paper's w(x)),
    optional. class_weight: (C,), optional, as in ``F.cross_entropy``. Pixels equal to
    ``ignore_index`` contribute 0. ``reduction``: "none" (per-pixel map), "sum", or "mean" (divided
    by the number of non-ignored pixels, or by the sum of their class weights when class_weight
    is given: ``F.cross_entropy``'s convention, so without a weight map the two are equal).
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"weighted_cross_entropy: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    return torch.ops.unet_ext.weighted_cross_entropy.default(
        logits, target, weight_map, class_weight, ignore_index, reduction)


def _opmath(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _spatial_collapses(t, first):
    """Whether dims [first, dim) of t can be read as one dim with a single stride."""
    expected = None
    for d in range(t.dim() - 1, first - 1, -1):
        if t.shape[d] == 1:
            continue
        if expected is not None and t.stride(d) != expected:
            return False
        expected = t.stride(d) * t.shape[d]
    return True


@torch.library.register_fake("unet_ext::_weighted_cross_entropy_forward")
def _(logits, target, weight_map, class_weight, ignore_index, reduction, opmath_loss=False):
    torch._check(logits.dim() >= 2, lambda: "unet_ext.weighted_cross_entropy: logits must have shape (N, C) or (N, C, d1, ..., dk)")
    torch._check(not target.dtype.is_floating_point and target.dtype != torch.bool,
                 lambda: f"unet_ext.weighted_cross_entropy: target must hold class indices, got {target.dtype}")
    pixel_shape = (logits.shape[0], *logits.shape[2:])
    torch._check(tuple(target.shape) == pixel_shape,
                 lambda: f"unet_ext.weighted_cross_entropy: target must have shape {pixel_shape}, got {tuple(target.shape)}")
    if weight_map is not None:
        torch._check(tuple(weight_map.shape) == pixel_shape,
                     lambda: f"unet_ext.weighted_cross_entropy: weight_map must have target's shape {pixel_shape}")
    opmath = _opmath(logits.dtype)
    pixels = math.prod(logits.shape[2:])
    loss_dtype = opmath if opmath_loss else logits.dtype
    loss = logits.new_empty(target.shape if reduction == "none" else (), dtype=loss_dtype)
    lse = logits.new_empty((logits.shape[0], pixels), dtype=opmath)
    total_weight = logits.new_empty((), dtype=opmath)
    return loss, lse, total_weight


@torch.library.register_fake("unet_ext::_weighted_cross_entropy_backward")
def _(grad_loss, logits, target, weight_map, class_weight, logsumexp, total_weight, ignore_index, reduction):
    grad = torch.empty_like(logits)
    if not _spatial_collapses(grad, 2):
        grad = logits.new_empty(logits.shape)
    return grad


def _setup_context(ctx, inputs, output):
    logits, target, weight_map, class_weight, ignore_index, reduction = inputs[:6]
    _, logsumexp, total_weight = output
    ctx.save_for_backward(logits, target, weight_map, class_weight, logsumexp, total_weight)
    ctx.ignore_index = ignore_index
    ctx.reduction = reduction
    ctx.mark_non_differentiable(logsumexp, total_weight)
    # Otherwise autograd fills a zero gradient the size of logsumexp for every backward.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, _grad_logsumexp, _grad_total_weight):
    logits, target, weight_map, class_weight, logsumexp, total_weight = ctx.saved_tensors
    if ctx.needs_input_grad[3]:
        raise NotImplementedError("weighted_cross_entropy: the derivative for 'class_weight' is not "
                                  "implemented (as in F.cross_entropy)")
    grad_logits = grad_weight_map = None
    if grad_loss is None:  # the loss itself was not used
        return None, None, None, None, None, None, None
    if ctx.needs_input_grad[0]:
        grad_logits = torch.ops.unet_ext._weighted_cross_entropy_backward.default(
            grad_loss, logits, target, weight_map, class_weight, logsumexp, total_weight,
            ctx.ignore_index, ctx.reduction)
    if ctx.needs_input_grad[2]:
        # Rare (weight maps are data), so plain torch ops: d loss / d w = scale * cw[t] * nll.
        kept = target != ctx.ignore_index
        safe_target = torch.where(kept, target, 0).long()
        picked = logits.gather(1, safe_target.unsqueeze(1)).squeeze(1).to(logsumexp.dtype)
        nll = logsumexp.view(target.shape) - picked
        if class_weight is not None:
            nll = nll * class_weight.to(nll.dtype)[safe_target]
        scale = grad_loss.to(nll.dtype)
        if ctx.reduction == "mean":
            scale = scale / total_weight
        grad_weight_map = torch.where(kept, scale * nll, 0).to(weight_map.dtype)
    return grad_logits, None, grad_weight_map, None, None, None, None


torch.library.register_autograd("unet_ext::_weighted_cross_entropy_forward", _backward,
                                setup_context=_setup_context)
