"""Python entry points of the fused ops: keyword defaults, fake kernels, autograd."""
from .crop_concat import crop_concat
from .weighted_cross_entropy import weighted_cross_entropy

__all__ = ["crop_concat", "weighted_cross_entropy"]
