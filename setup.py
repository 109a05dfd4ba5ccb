"""Builds unet_ext._C: the fused U-Net ops as a PyTorch C++/CUDA extension.

CUDA kernels are built when torch has CUDA and nvcc is found, or when FORCE_CUDA=1 (FORCE_CUDA=0:
never, a CPU-only build even on a GPU machine).
Environment: FORCE_CUDA, TORCH_CUDA_ARCH_LIST (default "8.0+PTX;9.0a": sm_80 mma.sync SASS plus
its PTX, which later GPUs (Blackwell sm_100/sm_120) JIT-compile at load, and Hopper's sm_90a, whose
wgmma/TMA conv kernels need the "a"), MAX_JOBS, DEBUG=1, UNET_EXT_WERROR=1 (warnings, spills
included, are errors: what CI uses), CUDA_HOME, UNET_EXT_CUTLASS=0 (build the generic CUDA kernels
only, on purpose: a CUDA build otherwise needs the nvidia-cutlass headers and fails without them).

The library is Python-agnostic (Py_LIMITED_API, an abi3 module): every op is reached through
torch.ops.unet_ext, so one build loads in any CPython >= 3.10 with the torch it was built against.
"""
import glob
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def fail(message):
    sys.stderr.write(f"\nunet_ext build error: {message}\n\n")
    sys.exit(1)


try:
    import torch
except ImportError:
    fail("PyTorch is not installed. Install it first (e.g. `pip install torch==2.14.1`), then "
         "build with `pip install --no-build-isolation -e .`.")

# The oldest torch we build and test against (the GPU lease machines run 2.11.0); README states the range.
MIN_TORCH = (2, 11)
if tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2]) < MIN_TORCH:
    fail(f"torch {torch.__version__} is too old: unet_ext needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]} "
         "(tested with 2.11.0, 2.14.1 and 2.15.0). Upgrade it, e.g. `pip install torch==2.14.1`.")


def flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def find_cuda_home():
    """The toolkit folder. nvcc on PATH may be a wrapper script, so ask nvcc itself (TOP=)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        for candidate in ("/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)):
            if os.path.exists(os.path.join(candidate, "bin", "nvcc")):
                return candidate
        return None
    try:
        probe = os.path.join(ROOT, "build", "nvcc_probe.cu")
        os.makedirs(os.path.dirname(probe), exist_ok=True)
        open(probe, "w").close()
        out = subprocess.run([nvcc, "--dryrun", "-c", probe, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        for line in (out.stdout + out.stderr).splitlines():
            if "TOP=" in line:
                return os.path.normpath(line.split("TOP=", 1)[1].strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def pip_cuda_include_dirs():
    """Headers of cuBLAS & co. that the pip CUDA build of torch brings (nvidia/cu13/include)."""
    import site
    dirs = []
    for base in site.getsitepackages() + [site.getusersitepackages()]:
        dirs += sorted(glob.glob(os.path.join(base, "nvidia", "cu*", "include")))
    return dirs


def cutlass_include_dirs():
    """CUTLASS headers from the nvidia-cutlass wheel (cutlass_library/source/include, and
    tools/util/include, which CUTLASS 3's conv collectives include), [] when UNET_EXT_CUTLASS=0.
    A CUDA build without them would silently have no tensor-core path, so it fails instead."""
    if os.environ.get("UNET_EXT_CUTLASS", "1").lower() in ("0", "false", "no", "off"):
        return []
    how = ("Install them with `pip install nvidia-cutlass==4.2.0.0` (scripts/setup.sh does; the "
           "device kit carries the wheel), or set UNET_EXT_CUTLASS=0 to build only the generic "
           "CUDA kernels on purpose (no tensor cores).")
    try:
        import cutlass_library
    except ImportError:
        fail("a CUDA build needs the CUTLASS headers for its tensor-core kernels, and the "
             "nvidia-cutlass package is not installed. " + how)
    source = os.path.join(os.path.dirname(cutlass_library.__file__), "source")
    paths = [os.path.join(source, "include"), os.path.join(source, "tools", "util", "include")]
    found = os.path.exists(os.path.join(paths[0], "cutlass", "cutlass.h")) and \
        os.path.exists(os.path.join(paths[1], "cutlass", "util", "packed_stride.hpp"))
    if not found:
        fail(f"the nvidia-cutlass package at {source} lacks cutlass/cutlass.h or "
             "cutlass/util/packed_stride.hpp. " + how)
    return paths


force_cuda = flag("FORCE_CUDA")
cuda_home = find_cuda_home()
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home  # cpp_extension reads it at import
with_cuda = force_cuda or (torch.cuda.is_available() and cuda_home is not None
                           and os.environ.get("FORCE_CUDA", "") == "")
if with_cuda and torch.version.cuda is None:
    fail(f"FORCE_CUDA=1 but the installed torch {torch.__version__} is a CPU build; install a "
         "CUDA build (e.g. `pip install torch==2.14.1`) or unset FORCE_CUDA.")
if with_cuda and cuda_home is None:
    fail("CUDA kernels requested but no CUDA toolkit was found: put nvcc on PATH or set CUDA_HOME.")

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0+PTX;9.0a")
arch_list = os.environ["TORCH_CUDA_ARCH_LIST"].replace(",", ";").replace(" ", ";").split(";")
debug = flag("DEBUG")
werror = flag("UNET_EXT_WERROR")

sources = sorted(glob.glob("csrc/ops/*.cpp") + glob.glob("csrc/ops/cpu/*.cpp") + glob.glob("csrc/ops/autocast/*.cpp"))
cuda_sources = sorted(glob.glob("csrc/ops/cuda/*.cu"))

cxx_flags = ["-O0", "-g"] if debug else ["-O3"]
# -fno-trapping-math lets GCC if-convert float compares, so the kernels' loops vectorise.
cxx_flags += ["-fopenmp", "-fno-trapping-math", "-Wall", "-Wextra", "-Wno-unused-parameter", "-fdiagnostics-color=always"]
if werror:
    cxx_flags.append("-Werror")
# UNET_EXT_SANITIZE=address,undefined: the CPU code built for AddressSanitizer/UBSan
# (scripts/sanitize.sh builds such a copy in its own folder and runs the op tests on it).
sanitize = os.environ.get("UNET_EXT_SANITIZE", "")
sanitize_flags = [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-fno-sanitize=vptr",
                  "-fno-sanitize-recover=all"] if sanitize else []
if sanitize:
    cxx_flags = [f for f in cxx_flags if f != "-O3"] + ["-O1", "-g"] + sanitize_flags
# -DNDEBUG: device asserts (CUTLASS/CuTe have many) compile to calls of __assertfail, and a call
# inside a wgmma pipeline makes ptxas serialise every wgmma of the Hopper kernels (C7510).
nvcc_flags = ["-O0", "-g", "-G"] if debug else ["-O3", "-lineinfo", "-DNDEBUG"]
# No -std here: cpp_extension picks the standard the installed torch needs (C++20 for 2.14).
# No --use_fast_math: it turns expf/logf into bare MUFU.EX2/MUFU.LG2 (log's absolute error
# ~2^-21 is a large relative error for losses near 0) and flushes denormals; the loss kernels
# need float32 within 2e-5 of float64. Kernels opt into intrinsics explicitly where safe.
nvcc_flags += ["--expt-relaxed-constexpr", "-Xptxas=--warn-on-spills"]
if werror:
    nvcc_flags += ["-Werror", "all-warnings", "-Xcompiler=-Werror"]
cutlass_dirs = cutlass_include_dirs() if with_cuda else []
cutlass_dir = cutlass_dirs[0] if cutlass_dirs else None
if cutlass_dirs:
    # nvcc only (the .cpp files never see CUTLASS); -isystem keeps -Werror to our own code.
    for path in cutlass_dirs:
        nvcc_flags += ["-isystem", path]
    nvcc_flags.append("-DUNET_EXT_WITH_CUTLASS")
    if any(arch.startswith("9.0a") for arch in arch_list):
        nvcc_flags.append("-DUNET_EXT_SM90A")  # the Hopper wgmma/TMA conv kernels get bodies
else:
    # UNET_EXT_CUTLASS=0: the generic kernels serve (the CUTLASS-only files are left out).
    cuda_sources = [s for s in cuda_sources if "_cutlass" not in os.path.basename(s)]

print(f"unet_ext: torch {torch.__version__}, CUDA kernels: "
      f"{'ON, archs ' + os.environ['TORCH_CUDA_ARCH_LIST'] + ', toolkit ' + cuda_home if with_cuda else 'OFF (CPU-only build)'}"
      f"{', CUTLASS ' + cutlass_dir if cutlass_dir else (', no CUTLASS' if with_cuda else '')}"
      f"{', warnings are errors' if werror else ''}"
      f"{', sanitizers ' + sanitize if sanitize else ''}", flush=True)

common = dict(
    name="unet_ext._C",
    include_dirs=[os.path.join(ROOT, "csrc")],
    extra_link_args=["-fopenmp"] + sanitize_flags,
    # One library for every CPython: no pybind11, no libtorch_python (cpp_extension then defines
    # Py_LIMITED_API and leaves them out); the module is named _C.abi3.so.
    py_limited_api=True,
)
if with_cuda:
    ext = CUDAExtension(sources=sources + cuda_sources,
                        # The arch list, readable in the library (build_info()["cuda_archs"]).
                        extra_compile_args={"cxx": cxx_flags + ["-DUNET_EXT_WITH_CUDA", "-DUNET_EXT_CUDA_ARCHS="
                                                                + ",".join(a for a in arch_list if a)],
                                            "nvcc": nvcc_flags + ["-DUNET_EXT_WITH_CUDA"]},
                        **{**common, "include_dirs": common["include_dirs"] + pip_cuda_include_dirs()})
else:
    ext = CppExtension(sources=sources, extra_compile_args={"cxx": cxx_flags}, **common)

setup(
    name="unet_ext",
    version="0.1.0",
    description="Fused C++/CUDA kernels and a drop-in U-Net for PyTorch",
    packages=find_packages(include=["unet_ext", "unet_ext.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["numpy", "tqdm", "scipy", "tifffile", "pillow", "matplotlib"],
    # The tests of unet_ext.convert (on other projects' U-Nets) and of the ONNX export; install
    # with torch pinned to the one the extension is built against (scripts/setup.sh does).
    extras_require={"test": ["pytest", "hypothesis", "segmentation-models-pytorch", "monai",
                             "onnx", "onnxscript", "onnxruntime"]},
    entry_points={"console_scripts": ["unet-ext=unet_ext.__main__:main"]},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
