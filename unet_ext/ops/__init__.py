"""Python entry points of the fused ops: keyword defaults, fake kernels, autograd."""
from .conv import conv2d_bias, conv2d_relu, conv2d_relu_concat, conv_transpose2x2
from .crop_concat import crop_concat
from .weighted_cross_entropy import weighted_cross_entropy

__all__ = ["conv2d_relu", "conv2d_bias", "conv2d_relu_concat", "conv_transpose2x2", "crop_concat", "weighted_cross_entropy"]
