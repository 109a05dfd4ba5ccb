"""What the build put into unet_ext._C, checked without a GPU: the CUDA kernels of every op are
compiled for sm_80 and sm_90, use no local memory (no register spills, no stack arrays), the
copy kernels use 128-bit loads and stores, and the CUTLASS conv kernels (when built) run on tensor
cores: HMMA (mma.sync) in both cubins, and in the sm_90a cubin also the Hopper kernels' HGMMA
(wgmma) fed by TMA. Skips on a CPU-only build or without cuobjdump."""
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import unet_ext

CUDA_OPS = ["crop_concat", "_crop_concat_backward", "_weighted_cross_entropy_forward",
            "_weighted_cross_entropy_backward", "conv2d_relu", "conv2d_bias", "_conv2d_backward",
            "conv_transpose2x2", "_conv_transpose2x2_backward", "max_pool2x2", "_max_pool2x2_backward"]


def _cuobjdump():
    candidates = [shutil.which("cuobjdump")]
    try:
        import triton  # the CUDA build of torch brings triton, which ships cuobjdump
        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "cuobjdump"))
    return next((c for c in candidates if c and os.path.exists(c)), None)


needs_cuda_build = pytest.mark.skipif(not unet_ext.build_info()["cuda_kernels"],
                                      reason="CPU-only build (build with FORCE_CUDA=1)")


def _dump(*args):
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found")
    return subprocess.run([tool, *args, unet_ext.build_info()["library"]], capture_output=True,
                          text=True, check=True).stdout


def test_build_info_reports_library():
    info = unet_ext.build_info()
    assert os.path.exists(info["library"]) and info["torch"] == torch.__version__


@needs_cuda_build
@pytest.mark.parametrize("op", CUDA_OPS)
def test_every_op_has_a_cuda_kernel(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"unet_ext::{op}", "CUDA")


def _built_archs():
    """sm_XX of each entry of the arch list the library was built with ("8.0+PTX" -> "sm_80")."""
    archs = unet_ext.build_info()["cuda_archs"]
    assert archs, "the library does not say which archs it was built for"
    return ["sm_" + a.split("+")[0].replace(".", "").rstrip("a") for a in archs]


@needs_cuda_build
def test_cubins_for_every_arch_built():
    elves = _dump("--list-elf")
    for arch in _built_archs():
        assert re.search(rf"\.{arch}a?\.cubin", elves), f"no {arch} cubin in:\n{elves}"


@needs_cuda_build
def test_no_local_memory_in_any_kernel():
    usage = _dump("--dump-resource-usage")
    functions = re.findall(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    assert functions, usage[:2000]
    spilling = [(name, stack, local) for name, _, stack, local in functions
                if int(stack) or int(local)]
    assert not spilling, f"kernels using stack/local memory (spills?): {spilling}"


@needs_cuda_build
def test_crop_concat_copies_use_128_bit_accesses():
    sass = _dump("--dump-sass")
    # Kernel sections start with "Function : <mangled name>"; keep crop_concat's.
    sections = re.split(r"\n\s*Function : ", sass)
    crop = "\n".join(s for s in sections if "crop_concat" in s.split("\n", 1)[0])
    assert crop, "no crop_concat kernels in the SASS"
    assert "LDG.E.128" in crop and "STG.E.128" in crop


def _sass_by_arch():
    """{"sm_80": sass, "sm_90": sass}: cuobjdump prints one "code for sm_XX" block per cubin."""
    blocks = re.split(r"\n\s*code for (sm_\d+a?)\s*\n", _dump("--dump-sass"))
    by_arch = {}
    for arch, text in zip(blocks[1::2], blocks[2::2]):
        by_arch[arch.rstrip("a")] = by_arch.get(arch.rstrip("a"), "") + text
    return by_arch


@needs_cuda_build
def test_cutlass_conv_kernels_use_tensor_cores():
    by_arch = _sass_by_arch()
    for arch in _built_archs():
        found_tf32 = False
        assert arch in by_arch, f"no {arch} SASS"
        sections = re.split(r"\n\s*Function : ", by_arch[arch])
        conv = [s for s in sections if "ImplicitGemmConvolution" in s.split("\n", 1)[0]]
        if not conv:
            pytest.skip("built without CUTLASS (nvidia-cutlass not installed or UNET_EXT_CUTLASS=0)")
        for section in conv:
            name = section.split("\n", 1)[0]
            # 16-bit: HMMA.16816.F32[.BF16]; float (TF32): HMMA.1688.F32.TF32.
            assert re.search(r"\bHMMA\.(16816\.F32|1688\.F32\.TF32)", section), \
                f"{arch}: CUTLASS conv kernel without HMMA: {name[:200]}"
            if "GemmShapeILi128ELi64ELi16EE" in name:  # the TF32 (float) block tile
                found_tf32 = True
                assert "HMMA.1688.F32.TF32" in section, f"{arch}: float conv kernel not on TF32: {name[:200]}"
            if "LinearCombinationRelu" in name:
                # torch.relu keeps NaN: the epilogue's max must be the NaN-propagating one.
                assert "FMNMX.NAN" in section, f"{arch}: ReLU epilogue drops NaN: {name[:200]}"
        assert found_tf32, f"{arch}: no TF32 (float) CUTLASS conv kernel"
        # conv_transpose2x2's forward is CUTLASS's strided dgrad (conv_transpose2x2_cutlass.cu).
        assert any("StridedDgrad" in s.split("\n", 1)[0] for s in conv), f"{arch}: no tensor-core up-conv"


@needs_cuda_build
def test_hopper_conv_kernels_use_wgmma_and_tma():
    """The sm_90a conv kernels (conv2d_cutlass_sm90.cu): fprop with ReLU / identity epilogue, dgrad
    and wgrad, for half and bfloat16, each on warpgroup MMA (HGMMA) fed by TMA loads; fprop and
    dgrad also store through TMA (wgrad's fp32 epilogue stores from registers)."""
    if not unet_ext.build_info()["cutlass_sm80"]:
        pytest.skip("built without CUTLASS (nvidia-cutlass not installed or UNET_EXT_CUTLASS=0)")
    if not unet_ext.build_info()["cutlass_sm90a"]:
        pytest.skip("built without sm_90a (TORCH_CUDA_ARCH_LIST does not name 9.0a)")
    sass = _sass_by_arch()["sm_90"]
    sections = re.split(r"\n\s*Function : ", sass)
    hopper = [s for s in sections if "MainloopSm90TmaGmmaWarpSpecializedImplicitGemm" in s.split("\n", 1)[0]]
    # 2 dtypes x (fprop ReLU, fprop ReLU on 128x64 tiles, fprop identity, dgrad, wgrad); the operator
    # is the problem shape's first template argument (cutlass::conv::Operator: 0 fprop, 1 dgrad, 2 wgrad).
    def operator(name):
        return re.search(r"ConvProblemShapeILNS\w+?OperatorE(\d)", name).group(1)

    operators = sorted(operator(s.split("\n", 1)[0]) for s in hopper)
    assert operators == ["0"] * 6 + ["1"] * 2 + ["2"] * 2, operators
    narrow = 0
    for section in hopper:
        name = section.split("\n", 1)[0]
        assert re.search(r"\bHGMMA\.64x(64|128)x16\.F32", section), f"Hopper conv kernel without HGMMA: {name[:200]}"
        narrow += bool(re.search(r"\bHGMMA\.64x64x16\.F32", section))
        assert "UTMALDG" in section, f"Hopper conv kernel without TMA loads: {name[:200]}"
        if operator(name) != "2":
            assert "UTMASTG" in section, f"Hopper fprop/dgrad kernel without TMA stores: {name[:200]}"
        assert "HMMA" not in section, f"Hopper conv kernel on mma.sync: {name[:200]}"
        # No calls: a device assert is a call of __assertfail, and a call inside the wgmma
        # pipeline makes ptxas serialise every wgmma (C7510): the kernels are built with -DNDEBUG.
        assert not re.search(r"\bCALL\.", section), f"Hopper conv kernel makes calls (asserts?): {name[:200]}"
        if "ReLu" in name:
            # cvt's .relu keeps NaN (canonical NaN), as torch.relu does.
            assert "F2FP.RELU" in section or "FMNMX.NAN" in section, f"ReLU epilogue not found: {name[:200]}"
    assert narrow == 2, f"{narrow} Hopper kernels on 64-wide HGMMA, expected the two narrow fprops"


def test_library_is_python_agnostic():
    """One build for every CPython >= 3.10 (the lease kit builds here with 3.11 for the GPU
    machine's 3.12): an abi3 module that links no libtorch_python and calls only the stable ABI."""
    library = unet_ext.build_info()["library"]
    assert library.endswith(".abi3.so"), library
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf not found")
    needed = subprocess.run([readelf, "-d", library], capture_output=True, text=True, check=True).stdout
    assert "libtorch_python" not in needed and "libpython" not in needed, needed
    symbols = subprocess.run([readelf, "--dyn-syms", "-W", library], capture_output=True, text=True, check=True).stdout
    undefined_python = sorted({line.split()[-1].split("@")[0] for line in symbols.splitlines()
                               if " UND " in line and re.search(r"\s_?Py", line)})
    # PyModule_Create2 is PyModule_Create's stable-ABI entry; anything else would tie us to one CPython.
    assert undefined_python == ["PyModule_Create2"], undefined_python


@needs_cuda_build
def test_ptx_for_gpus_after_hopper():
    """The default arch list ends its sm_80 entry with +PTX: Blackwell (sm_100, sm_120) has no
    cubin of ours and JIT-compiles that PTX at load instead of failing with "no kernel image"."""
    archs = unet_ext.build_info()["cuda_archs"]
    if not any(a.endswith("+PTX") for a in archs):
        pytest.skip(f"built for {archs} (no PTX asked for)")
    # cuobjdump names an embedded PTX by its virtual arch: "<source>.sm_80.ptx" (compute_80).
    assert re.search(r"\.sm_80\.ptx|compute_80", _dump("--list-ptx")), "no compute_80 PTX in the library"


def _setup_py(tmp_path, fake_modules, **env):
    """Runs setup.py --version with fake top-level modules ({name: source}) shadowing real ones."""
    for name, source in fake_modules.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(source)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run_env = {**os.environ, "PYTHONPATH": str(tmp_path), **env}
    return subprocess.run([sys.executable, os.path.join(root, "setup.py"), "--version"], cwd=root,
                          capture_output=True, text=True, env=run_env, timeout=120)


def test_setup_refuses_a_torch_older_than_supported(tmp_path):
    result = _setup_py(tmp_path, {"torch": "__version__ = '2.10.1+cu128'\n"})
    assert result.returncode != 0
    assert "torch 2.10.1+cu128 is too old" in result.stderr and ">= 2.11" in result.stderr, result.stderr


def test_cuda_build_without_cutlass_fails_with_how_to_get_it(tmp_path):
    """No silent generic-only CUDA build: without the nvidia-cutlass headers a CUDA build stops
    and says how to get them, or how to build without tensor cores on purpose."""
    if torch.version.cuda is None:
        pytest.skip("a CPU build of torch: no CUDA build to ask for")
    result = _setup_py(tmp_path, {"cutlass_library": "raise ImportError('hidden by the test')\n"},
                       FORCE_CUDA="1", UNET_EXT_CUTLASS="1")
    assert result.returncode != 0
    assert "pip install nvidia-cutlass" in result.stderr and "UNET_EXT_CUTLASS=0" in result.stderr, result.stderr
