"""Spatial sizes through the U-Net (shared by unet_ext.UNet and unet_ext.reference.UNet)."""

__all__ = ["output_size", "is_valid_input_size", "valid_input_size", "check_input_size"]


def _trace(size, depth, padding):
    """Output size for an input of `size`, or None if some pooling sees an odd size or a map
    vanishes (valid padding). "same" keeps the size (any size >= 2**depth)."""
    if padding == "same":
        return size if size >= 2 ** depth else None
    for _ in range(depth):
        size -= 4  # two 3x3 valid convolutions
        if size < 2 or size % 2:
            return None
        size //= 2  # 2x2 max-pool
    size -= 4
    for _ in range(depth):
        if size < 1:
            return None
        size = 2 * size - 4  # 2x2 up-conv, then two 3x3 valid convolutions
    return size if size >= 1 else None


def output_size(size, depth=4, padding="valid"):
    out = _trace(size, depth, padding)
    if out is None:
        check_input_size(size, depth, padding)
    return out


def is_valid_input_size(size, depth=4, padding="valid"):
    return _trace(size, depth, padding) is not None


def valid_input_size(size, depth=4, padding="valid"):
    """The smallest valid input size >= size."""
    n = max(size, 1)
    while _trace(n, depth, padding) is None:
        n += 1
    return n


def check_input_size(size, depth=4, padding="valid"):
    if _trace(size, depth, padding) is not None:
        return
    if padding == "same":
        raise ValueError(f"input size {size} is too small for a U-Net of depth {depth}: "
                         f"use at least {2 ** depth}")
    above = valid_input_size(size, depth, padding)
    below = next((n for n in range(size - 1, 0, -1) if _trace(n, depth, padding) is not None), None)
    hint = f"use {below} or {above}" if below else f"use {above}"
    raise ValueError(f"{size} is not a valid input size for this U-Net (depth {depth}, valid "
                     f"padding); {hint}")
