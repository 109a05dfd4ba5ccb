"""Python entry points of the fused ops: keyword defaults, fake kernels, autograd."""
from .conv import conv2d_bias, conv2d_relu, conv2d_relu_concat, conv_transpose2x2
from .crop_concat import crop_concat
from .max_pool import max_pool2x2
from .weighted_cross_entropy import weighted_cross_entropy

__all__ = ["conv2d_relu", "conv2d_bias", "conv2d_relu_concat", "conv_transpose2x2", "crop_concat", "max_pool2x2", "weighted_cross_entropy"]
