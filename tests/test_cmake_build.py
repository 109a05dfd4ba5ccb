"""The CMake build (CMakeLists.txt) is the same library as setup.py's: the same ops registered for
the same dispatch keys, the same unet_ext functions compiled, and in CUDA builds the same CUDA
kernels for the same archs (cuobjdump). Skipped unless a CMake build is present:

    make cmake            # CPU-only: cmake -S . -B build-cmake -G Ninja -DUNET_EXT_CUDA=OFF && cmake --build build-cmake
    make cmake CUDA=1     # build-cmake-cuda-9.0a, compared with `make build CUDA=1`

Each CMake library (build-cmake*/_C.abi3.so, or UNET_EXT_CMAKE_LIBRARY) is compared with the
setup.py library of the same kind: the in-place unet_ext/_C.abi3.so or build/lib-*/unet_ext/_C.abi3.so.
"""
import glob
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from unet_ext import _kernels
from unet_ext.__main__ import _cuobjdump

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIST_OPS = """
import json, torch, unet_ext
keys = ("CPU", "CUDA", "Meta", "Autograd", "AutocastCPU", "AutocastCUDA")
ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("unet_ext::"))
info = unet_ext.build_info()
print(json.dumps({"ops": {op: [k for k in keys if torch._C._dispatch_has_kernel_for_dispatch_key(op, k)] for op in ops},
                  "cuda": info["cuda_kernels"], "cutlass_sm80": info["cutlass_sm80"],
                  "cutlass_sm90a": info["cutlass_sm90a"], "cuda_archs": info["cuda_archs"]}))
"""


def _cmake_libraries():
    found = sorted(glob.glob(os.path.join(REPO, "build-cmake*", "_C.abi3.so")))
    if os.environ.get("UNET_EXT_CMAKE_LIBRARY"):
        found.insert(0, os.environ["UNET_EXT_CMAKE_LIBRARY"])
    return found


def _setup_libraries():
    """The library this test run loaded (UNET_EXT_LIBRARY, e.g. the lease kit's) first, then the
    in-place and build/lib-* ones."""
    loaded = [os.environ["UNET_EXT_LIBRARY"]] if os.environ.get("UNET_EXT_LIBRARY") else []
    return [p for p in loaded + [os.path.join(REPO, "unet_ext", "_C.abi3.so")]
            + sorted(glob.glob(os.path.join(REPO, "build", "lib-*", "unet_ext", "_C.abi3.so"))) if os.path.isfile(p)]


# What unet_ext's loader says when a library was built against another torch (ImportError text).
OTHER_TORCH = "does not match this torch"


def _describe(library, other_torch_ok=False):
    """The library's ops and tensor-core paths; None if it was built against another torch and
    other_torch_ok (a kit build under the shared env, or the reverse: not comparable here)."""
    env = dict(os.environ, UNET_EXT_LIBRARY=library)
    out = subprocess.run([sys.executable, "-c", LIST_OPS], capture_output=True, text=True, env=env, cwd=REPO)
    if out.returncode != 0 and other_torch_ok and OTHER_TORCH in out.stderr:
        return None
    assert out.returncode == 0, f"{library} does not load: {out.stderr[-2000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def _functions(library):
    """unet_ext's own compiled functions (demangled names of defined text symbols)."""
    out = subprocess.run(["nm", "-C", "--defined-only", library], capture_output=True, text=True, check=True)
    names = set()
    for line in out.stdout.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[1] in "tTwW" and parts[2].startswith("unet_ext::") and "lambda" not in parts[2]:
            names.add(parts[2])
    return names


def _without_unit_ids(mangled):
    """A kernel name with each anonymous namespace's per-compile id dropped: nvcc names it
    _GLOBAL__N__<hash>_<n>_<file>_cu_<hash>_<pid> (its length prefixed), and the hashes differ
    between two builds of the same source (seen on the first CMake CUDA build)."""
    out, i = [], 0
    for m in re.finditer(r"(\d+)(_GLOBAL__N__)", mangled):
        if m.start() < i:
            continue
        length = int(m.group(1))
        name = mangled[m.start(2):m.start(2) + length]
        unit = re.search(r"_\d+_(\w+?_cu)_[0-9a-f]+_\d+$", name)
        out.append(mangled[i:m.start()] + "ANON(" + (unit.group(1) if unit else "?") + ")")
        i = m.start(2) + length
    return "".join(out) + mangled[i:]


@pytest.mark.parametrize("cmake_library", _cmake_libraries() or [None])
def test_cmake_build_matches_setup_py(cmake_library):
    if cmake_library is None:
        pytest.skip("no CMake build (make cmake [CUDA=1]: build-cmake*/_C.abi3.so)")
    newest_source = max(os.path.getmtime(f) for f in glob.glob(os.path.join(REPO, "csrc", "**", "*"), recursive=True)
                        + [os.path.join(REPO, "CMakeLists.txt")] if os.path.isfile(f))
    if os.path.getmtime(cmake_library) < newest_source:
        pytest.skip(f"{cmake_library} is older than the sources (rebuild it: make cmake)")
    cmake = _describe(cmake_library, other_torch_ok=True)
    if cmake is None:
        pytest.skip(f"{cmake_library} was built against another torch than {torch.__version__} (rebuild it, "
                    "or run this test under that torch, e.g. the lease kit's venv)")
    described = {p: _describe(p, other_torch_ok=True) for p in _setup_libraries()}
    same_kind = [p for p, d in described.items() if d is not None and d["cuda"] == cmake["cuda"]]
    if not same_kind:
        pytest.skip(f"no setup.py build {'with' if cmake['cuda'] else 'without'} CUDA kernels to compare "
                    f"{cmake_library} with (make build{' CUDA=1' if cmake['cuda'] else ''})")
    setup_library = same_kind[0]
    setup = described[setup_library]
    assert cmake == setup, f"{cmake_library} and {setup_library} register different ops or tensor-core paths"
    if shutil.which("nm"):
        only_cmake, only_setup = _functions(cmake_library) - _functions(setup_library), \
            _functions(setup_library) - _functions(cmake_library)
        assert not only_cmake and not only_setup, (
            f"functions only in the CMake build: {sorted(only_cmake)[:5]}; only in setup.py's: {sorted(only_setup)[:5]}")
    if cmake["cuda"] and _cuobjdump():
        kernels = [{(r["arch"], _without_unit_ids(r["mangled"])) for r in _kernels.collect(lib, _cuobjdump())}
                   for lib in (cmake_library, setup_library)]
        assert kernels[0] == kernels[1], (
            f"CUDA kernels only in the CMake build: {sorted(kernels[0] - kernels[1])[:5]}; "
            f"only in setup.py's: {sorted(kernels[1] - kernels[0])[:5]}")
