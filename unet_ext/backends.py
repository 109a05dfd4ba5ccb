"""Run-time switches of unet_ext's kernels, in the manner of ``torch.backends``.

``unet_ext.backends.cpu.allow_winograd`` (default True): float32 3x3 convolutions on the CPU with
enough channels take the Winograd F(4x4, 3x3) path (forward, the input gradient, and the weight
gradient by F(3x3, 4x4); about 4x fewer multiplications, somewhat larger rounding error, see
README "Winograd"), like
``torch.backends.cudnn.allow_tf32``. float64 never does. ``UNET_EXT_WINOGRAD=0`` in the
environment starts with it off. ``with unet_ext.backends.cpu.flags(allow_winograd=False):``
turns it off for a block.
"""
import contextlib

import torch

__all__ = ["cpu"]


class _CpuBackend:
    @property
    def allow_winograd(self) -> bool:
        return torch.ops.unet_ext._allow_winograd()

    @allow_winograd.setter
    def allow_winograd(self, allow: bool) -> None:
        torch.ops.unet_ext._set_allow_winograd(bool(allow))

    @contextlib.contextmanager
    def flags(self, allow_winograd: bool = True):
        previous = self.allow_winograd
        self.allow_winograd = allow_winograd
        try:
            yield
        finally:
            self.allow_winograd = previous

    def __repr__(self):
        return f"unet_ext.backends.cpu(allow_winograd={self.allow_winograd})"


cpu = _CpuBackend()
