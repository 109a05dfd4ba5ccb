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


# A checkpoint's model_config is read from a file: checked before a network is built from it,
# so a corrupt or hostile one is one clear error instead of a multi-terabyte allocation.
MAX_PARAMETERS = 2 ** 30  # 4 GiB of float32 weights; the paper's network has 31 M
MAX_DEPTH = 10            # a valid-padding input grows as 2**depth * ~16 pixels
CONFIG_KEYS = ("in_channels", "num_classes", "base_channels", "depth", "padding", "dropout")


def parameter_count(in_channels, num_classes, base_channels, depth):
    """Weights + biases of unet_ext.UNet(...) (model.py's layer list), without building it."""
    channels = [base_channels * 2 ** i for i in range(depth + 1)]
    count = 0
    for c_in, c_out in zip([in_channels] + channels[:-1], channels):
        count += 9 * c_in * c_out + 9 * c_out * c_out + 2 * c_out
    for i in range(depth):
        c_in, c_out = channels[i + 1], channels[i]
        count += 4 * c_in * c_out + 9 * c_in * c_out + 9 * c_out * c_out + 3 * c_out
    return count + channels[0] * num_classes + num_classes


def check_model_config(config):
    """Raises ValueError (one line) unless `config` is a dict of UNet arguments with sane types
    and ranges: positive ints, depth <= MAX_DEPTH, padding valid|same, dropout in [0, 1), and at
    most MAX_PARAMETERS weights."""
    if not isinstance(config, dict):
        raise ValueError(f"model_config must be a dict, got {type(config).__name__}")
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise ValueError(f"model_config lacks {', '.join(missing)}")
    for key in ("in_channels", "num_classes", "base_channels", "depth"):
        value = config[key]
        if type(value) is not int or value < 1:  # noqa: E721 - bool is an int subclass
            raise ValueError(f"model_config {key} must be an int >= 1, got {value!r}")
    if config["depth"] > MAX_DEPTH:
        raise ValueError(f"model_config depth {config['depth']} is above {MAX_DEPTH}")
    if config["padding"] not in ("valid", "same"):
        raise ValueError(f"model_config padding must be 'valid' or 'same', got {config['padding']!r}")
    dropout = config["dropout"]
    if type(dropout) not in (int, float) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"model_config dropout must be a number in [0, 1), got {dropout!r}")
    count = parameter_count(config["in_channels"], config["num_classes"], config["base_channels"],
                            config["depth"])
    if count > MAX_PARAMETERS:
        raise ValueError(f"model_config describes a network of {count:,} parameters "
                         f"({4 * count / 2 ** 30:.0f} GiB in float32), above the limit of "
                         f"{MAX_PARAMETERS:,}")
