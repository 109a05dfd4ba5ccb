"""`unet-ext info --kernels` (unet_ext/_kernels.py): per-kernel registers, shared memory, spills and
tensor-core instruction counts from cuobjdump. The parsers run on a fixed sample; a two-kernel
object compiled with nvcc checks the counts for real; the built library's own table is checked
when it has CUDA kernels (a CUDA build; CPU-only builds skip)."""
import os
import shutil
import subprocess
import sys

import pytest

import unet_ext
from unet_ext import _kernels
from unet_ext.__main__ import _cuobjdump

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RESOURCES = """
Fatbin elf code:
================
arch = sm_90a
code version = [1,8]

Resource usage:
 Common:
  GLOBAL:0
 Function _ZN8unet_ext3wce12forward_cudaEv:
  REG:40 STACK:16 SHARED:2048 LOCAL:8 CONSTANT[0]:920 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

SASS = """
	code for sm_90a
		Function : _ZN8unet_ext3wce12forward_cudaEv
        /*0000*/                   HGMMA.64x128x16.F32 R24, gdesc[UR4], RZ, !UPT ;   /* 0x0000000004187df0 */
                                                                                      /* 0x000fe2000bf00018 */
        /*0010*/              @!P0 STL [R1], R2 ;                                    /* 0x0000000201008387 */
        /*0020*/                   LDL.64 R4, [R1+0x8] ;                             /* 0x0000080001047983 */
        /*0030*/              @P1  HMMA.16816.F32 R8, R12, R16, R8 ;                 /* 0x000000100c08723c */
        /*0040*/                   EXIT ;                                            /* 0x000000000000794d */
"""


def test_parsers_on_a_sample():
    # Keys drop the arch suffix: cuobjdump 12.8 (torch 2.11's triton) lists the SASS of an sm_90a
    # cubin as "code for sm_90" and its resources as "arch = sm_90a"; both must join.
    key = ("sm_90", "_ZN8unet_ext3wce12forward_cudaEv")
    assert _kernels.parse_resource_usage(RESOURCES) == {key: dict(REG=40, STACK=16, SHARED=2048, LOCAL=8)}
    counts = dict(HMMA=1, HGMMA=1, IMMA=0, STL=1, LDL=1)
    assert _kernels.parse_sass(SASS.splitlines()) == {key: counts}
    assert _kernels.parse_sass(SASS.replace("code for sm_90a", "code for sm_90").splitlines()) == {key: counts}


def test_shorten_keeps_the_first_template_level():
    name = "void cutlass::device_kernel<cutlass::conv::kernel::ImplicitGemm<A<B>, C>>(C::Params)"
    assert _kernels.shorten(name) == "void cutlass::device_kernel<cutlass::conv::kernel::ImplicitGemm<...>>(...)"
    name = "void (anonymous namespace)::tiled_kernel<8, 4>((anonymous namespace)::Shape, float const*)"
    assert _kernels.shorten(name) == "void (anon)::tiled_kernel<8, 4>(...)"


KERNELS_CU = r"""
#include <mma.h>
using namespace nvcuda;
__global__ void tc_kernel(const half* a, const half* b, float* c) {
  wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
  wmma::fill_fragment(fc, 0.0f);
  wmma::load_matrix_sync(fa, a, 16);
  wmma::load_matrix_sync(fb, b, 16);
  wmma::mma_sync(fc, fa, fb, fc);
  wmma::store_matrix_sync(c, fc, 16, wmma::mem_row_major);
}
__global__ void spill_kernel(float* out, int k) {
  float buf[64];
  for (int i = 0; i < 64; ++i) buf[i] = out[i * k];
  float s = 0.f;
  for (int i = 0; i < 64; ++i) s += buf[i] * buf[(i * 7 + k) & 63];
  out[threadIdx.x] = s;
}
"""


def _nvcc():
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    found = os.path.join(home, "bin", "nvcc")
    return found if os.access(found, os.X_OK) else shutil.which("nvcc")


@pytest.mark.skipif(_cuobjdump() is None or _nvcc() is None, reason="needs nvcc and cuobjdump")
def test_counts_on_a_compiled_object(tmp_path):
    source = tmp_path / "kernels.cu"
    source.write_text(KERNELS_CU)
    obj = tmp_path / "kernels.o"
    # 32 registers for 64 live floats: ptxas must spill spill_kernel.
    subprocess.run([_nvcc(), "-arch=sm_80", "-maxrregcount=32", "-c", str(source), "-o", str(obj)],
                   check=True, capture_output=True)
    rows = {r["kernel"].split("(")[0]: r for r in _kernels.collect(str(obj), _cuobjdump())}
    assert set(rows) == {"tc_kernel", "spill_kernel"}
    assert rows["tc_kernel"]["HMMA"] > 0 and rows["tc_kernel"]["STL"] == 0
    # ptxas puts spills in the stack frame (STACK), LOCAL counts other local arrays.
    assert rows["spill_kernel"]["STL"] > 0 and rows["spill_kernel"]["STACK"] > 0
    assert rows["spill_kernel"]["REG"] <= 32 and rows["spill_kernel"]["arch"] == "sm_80"
    out = subprocess.run([sys.executable, "-m", "unet_ext", "info", "--kernels", "--library", str(obj)],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "| sm_80 |" in out.stdout and "1 kernel(s) with local memory or spill stores: spill_kernel" in out.stdout


@pytest.mark.skipif(not unet_ext.build_info()["cuda_kernels"], reason="CPU-only build: no CUDA kernels")
@pytest.mark.skipif(_cuobjdump() is None, reason="cuobjdump not found")
def test_library_kernels():
    build = unet_ext.build_info()
    rows = _kernels.collect(build["library"], _cuobjdump())
    names = " ".join(r["kernel"] for r in rows)
    for op in ("crop_concat", "max_pool", "wce"):
        assert op in names, f"no {op} kernel in the library's SASS"
    assert all(r["REG"] is not None and r["HMMA"] is not None for r in rows)
    assert not [r["kernel"] for r in rows if r["STL"]], "kernels spill (CI builds with --warn-on-spills)"
    if build["cutlass_sm80"]:
        assert any(r["HMMA"] for r in rows), "CUTLASS kernels without HMMA"
    if build["cutlass_sm90a"]:
        assert any(r["HGMMA"] and r["arch"].startswith("sm_90") for r in rows), "sm_90a kernels without HGMMA"
    out = subprocess.run([sys.executable, "-m", "unet_ext", "info", "--kernels", "--filter", "max_pool"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and "max_pool" in out.stdout, out.stderr


def test_cpu_only_library_says_so():
    if unet_ext.build_info()["cuda_kernels"] or _cuobjdump() is None:
        pytest.skip("a CUDA build, or no cuobjdump")
    out = subprocess.run([sys.executable, "-m", "unet_ext", "info", "--kernels"], capture_output=True,
                         text=True, cwd=REPO)
    assert out.returncode == 1 and "no CUDA kernels" in out.stderr
