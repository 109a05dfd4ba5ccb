"""unet_ext: fused C++/CUDA kernels for U-Net (Ronneberger et al., 2015) as PyTorch ops.

Ops live in ``torch.ops.unet_ext`` and are wrapped in :mod:`unet_ext.ops`; plain-PyTorch
references of each are in :mod:`unet_ext.reference`.
"""
import functools
import importlib.util
import os
import re
import sys

import torch  # noqa: F401  (loads libtorch before our library)


def _load_library():
    """unet_ext._C, the compiled library: the one built in the package, or the file that
    UNET_EXT_LIBRARY names (a prebuilt one: the GPU lease kit's, a CMake build's)."""
    path = os.environ.get("UNET_EXT_LIBRARY")
    if not path:
        from . import _C
        return _C
    if not os.path.isfile(path):
        raise ImportError(f"UNET_EXT_LIBRARY={path!r} is not a file (expected a built unet_ext _C library)")
    spec = importlib.util.spec_from_file_location(f"{__name__}._C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[spec.name] = module
    return module


try:
    _C = _load_library()  # registers torch.ops.unet_ext.*
except ImportError as error:  # pragma: no cover - depends on the install
    raise ImportError(
        "unet_ext's compiled library (unet_ext._C) is missing or does not match this torch "
        f"({torch.__version__}): {error}\nBuild it from the repository root with "
        "`pip install --no-build-isolation -e .` (see README.md)."
    ) from error

from . import ops  # noqa: E402,F401
from . import backends  # noqa: E402,F401
from .ops import conv2d_bias, conv2d_relu, conv2d_relu_concat, conv_transpose2x2, crop_concat, weighted_cross_entropy  # noqa: E402,F401
from . import nn  # noqa: E402,F401
from .model import UNet  # noqa: E402,F401
from ._unet_shape import output_size, valid_input_size  # noqa: E402,F401
from .weight_map import weight_map  # noqa: E402,F401
from .tiling import predict_tiled  # noqa: E402,F401
from . import reference  # noqa: E402,F401
from .convert import ConversionReport, convert  # noqa: E402,F401
# Registers our ops' aten decompositions, which torch.onnx.export uses (onnx is imported only
# when exporting).
from . import export  # noqa: E402,F401
from .export import export_onnx  # noqa: E402,F401

# Submodules that pull in more than torch (scipy, tifffile) load on first use, so
# `import unet_ext; unet_ext.data....` works without making `import unet_ext` slower.
_LAZY_SUBMODULES = ("data", "metrics", "predict", "train")


def __getattr__(name):
    if name in _LAZY_SUBMODULES:
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))

__version__ = "0.1.0"


def empty_cache():
    """Returns the CPU memory unet_ext keeps for reuse to the system: freed outputs of 2 MiB or
    more are cached (512 MiB at most) so that the next output of the same size costs no page
    faults (like torch.cuda.empty_cache for the CUDA caching allocator)."""
    torch.ops.unet_ext._empty_cache()


@functools.lru_cache(maxsize=None)
def _library_bytes():
    with open(_C.__file__, "rb") as f:
        return f.read()


def _library_has(*names):
    """Whether each kernel (template) name occurs in our library, e.g. in its fatbin's symbols."""
    return tuple(name.encode() in _library_bytes() for name in names)


def _cuda_archs():
    """The TORCH_CUDA_ARCH_LIST the library was built with (csrc/ops/registration.cpp), or []."""
    found = re.search(rb"unet_ext_cuda_archs=([0-9A-Za-z.+,]*);", _library_bytes())
    return found.group(1).decode().split(",") if found and found.group(1) else []


def build_info():
    """What the compiled library contains: CUDA kernels or not, and its tensor-core conv paths:
    CUTLASS sm_80 mma.sync kernels (any GPU from Ampere on) and sm_90a wgmma/TMA kernels
    (H100/H200; built when TORCH_CUDA_ARCH_LIST names 9.0a)."""
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(
        "unet_ext::crop_concat", "CUDA")
    sm80, sm90a = _library_has("ImplicitGemmConvolution", "MainloopSm90TmaGmmaWarpSpecializedImplicitGemm") \
        if has_cuda else (False, False)
    return {
        "torch": torch.__version__,
        "cuda_kernels": bool(has_cuda),
        "cutlass_sm80": sm80,
        "cutlass_sm90a": sm90a,
        "cuda_archs": _cuda_archs() if has_cuda else [],
        "cuda_available": torch.cuda.is_available(),
        "library": _C.__file__,
    }
