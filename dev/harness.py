"""The dev/ workshops' common part (llm.c's dev/cuda, in Python around plain C++/CUDA files):
build a variant file into a shared library (cached by content: an unchanged file is not rebuilt),
validate each variant against unet_ext.reference before it is timed, time the variants
interleaved (median, p20, p80), and print the table of variants and sweeps.

Variant files are torch-free (`extern "C"` entry points taking raw pointers), so they build in
seconds with the library's own flags and headers (-I csrc): a variant can include the library's
kernel headers and time literally the library's code next to its alternatives.
"""
import ctypes
import hashlib
import os
import shutil
import subprocess
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(REPO, "build", "dev")
# As setup.py: no -march (the files pick their ISA with #pragma GCC target), no fast math.
CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp", "-fno-trapping-math", "-Wall", "-Wextra",
             "-Wno-unused-parameter", "-shared", "-fPIC"]
# -cudart=shared: the variants use the CUDA runtime torch has loaded (libcudart.so.13), so one
# runtime owns the context, the default stream and the pointers torch hands over.
NVCC_FLAGS = ["-O3", "-lineinfo", "-std=c++20", "--expt-relaxed-constexpr", "-shared",
              "-Xcompiler=-fPIC", "-Xptxas=--warn-on-spills", "-cudart=shared"]


def nvcc():
    home = os.environ.get("CUDA_HOME")
    candidates = [os.path.join(home, "bin", "nvcc")] if home else []
    candidates += [shutil.which("nvcc") or "", "/usr/local/cuda/bin/nvcc"]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def cuda_arch():
    """sm_XY[a] for nvcc: DEV_CUDA_ARCH, else the GPU's, else sm_90a (the lease's H200)."""
    if os.environ.get("DEV_CUDA_ARCH"):
        return os.environ["DEV_CUDA_ARCH"]
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"sm_{major}{minor}{'a' if major == 9 else ''}"
    return "sm_90a"


def library_path(source, defines=(), arch=None, out_dir=CACHE):
    """Where build() puts (or finds) the library of `source` with these defines."""
    kind = "cuda" if source.endswith(".cu") else "cpu"
    flags = (NVCC_FLAGS + [f"-arch={arch or cuda_arch()}"]) if kind == "cuda" else CXX_FLAGS
    digest = hashlib.sha1()
    for path in [source] + _local_headers(source):
        with open(path, "rb") as f:
            digest.update(f.read())
    digest.update(" ".join(flags + list(defines)).encode())
    name = os.path.splitext(os.path.basename(source))[0]
    return os.path.join(out_dir, f"{name}-{digest.hexdigest()[:12]}.so"), flags


def _local_headers(source):
    """The library headers a variant file may include (its build is redone when they change)."""
    roots = [os.path.join(REPO, "csrc", "ops", sub) for sub in ("", "cpu", "cuda", "common")]
    found = []
    for root in roots:
        for name in sorted(os.listdir(root)):
            if name.endswith((".h", ".cuh")):
                found.append(os.path.join(root, name))
    return found


def build(source, defines=(), arch=None, out_dir=CACHE, verbose=True):
    """Compiles source (.cpp with g++, .cu with nvcc) into a shared library; returns its path."""
    path, flags = library_path(source, defines, arch, out_dir)
    if os.path.exists(path):
        return path
    os.makedirs(out_dir, exist_ok=True)
    compiler = nvcc() if source.endswith(".cu") else (os.environ.get("CXX") or "g++")
    if compiler is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME): the CUDA variants need it to build")
    command = [compiler, *flags, *defines, "-I", os.path.join(REPO, "csrc"), source, "-o", path + ".tmp"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"build failed: {' '.join(command)}\n{done.stdout}{done.stderr}")
    os.replace(path + ".tmp", path)
    if verbose:
        warnings = (done.stdout + done.stderr).strip()
        print(f"built {os.path.relpath(path, REPO)} in {time.perf_counter() - start:.1f} s"
              + (f"\n{warnings}" if warnings else ""))
    return path


def library():
    """(unet_ext, unet_ext.reference), or (None, the reference module alone) when the library does
    not load (another torch, not built): the variants still run, without a 'library op' row."""
    try:
        import unet_ext
        from unet_ext import reference
        return unet_ext, reference
    except ImportError as error:
        print(f"note: unet_ext's library does not load, so no 'library op' row ({str(error).splitlines()[0]})")
        return None, load_reference()


def load_reference():
    """unet_ext/reference.py (plain torch) without the package, whose import loads the library."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("unet_ext_reference", os.path.join(REPO, "unet_ext", "reference.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(path):
    return ctypes.CDLL(path)


def ptr(tensor):
    return ctypes.c_void_p(tensor.data_ptr())


def validate(name, got, want, rtol, atol):
    """llm.c's validate_result: the variant's output against the reference, before any timing."""
    got, want = got.double().cpu(), want.double().cpu()
    if got.shape != want.shape:
        raise AssertionError(f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    bad = ~torch.isclose(got, want, rtol=rtol, atol=atol)
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(f"{name}: {int(bad.sum())} of {got.numel()} values differ beyond rtol={rtol} "
                             f"atol={atol}; first at {i}: {got.flatten()[i].item():.8g} vs "
                             f"{want.flatten()[i].item():.8g}")


def time_interleaved(fns, device, rounds=None, budget_s=2.0, warmup=2):
    """{name: (median, p20, p80, min) ms}: the callables called in turn, round after round, so that
    a change of machine load hits every variant alike (CUDA: events; CPU: perf_counter). On a
    loaded CPU the minimum is the run least disturbed by other processes: compare those."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    if device == "cuda":
        torch.cuda.synchronize()
    times = {name: [] for name in names}
    start, done = time.perf_counter(), 0
    while (rounds is None and (done < 5 or (time.perf_counter() - start < budget_s and done < 200))) or \
            (rounds is not None and done < rounds):
        for name in names:
            if device == "cuda":
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                fns[name]()
                end.record()
                end.synchronize()
                times[name].append(begin.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fns[name]()
                times[name].append((time.perf_counter() - t0) * 1e3)
        done += 1
    return {name: tuple(float(v) for v in np.percentile(times[name], [50, 20, 80, 0])) for name in names}


def table(rows, baseline):
    """Markdown: one row per variant/setting; speed-up against the row named `baseline`."""
    base = next((r["ms"][0] for r in rows if r["name"] == baseline), None)
    lines = ["| variant | setting | median ms [p20, p80] | min ms | GB/s (min) | vs " + baseline + " (median, min) |",
             "|---|---|---|---|---|---|"]
    base_min = next((r["ms"][3] for r in rows if r["name"] == baseline), None)
    for r in rows:
        median, p20, p80, least = r["ms"]
        gbs = f"{r['bytes'] / least / 1e6:.1f}" if r.get("bytes") else "—"
        speed = f"{base / median:.2f}x, {base_min / least:.2f}x" if base else "—"
        lines.append(f"| {r['name']} | {r.get('setting', '')} | {median:.3f} [{p20:.3f}, {p80:.3f}] | {least:.3f} | "
                     f"{gbs} | {speed} |")
    return "\n".join(lines)


def load_note():
    """The machine's load, to be printed next to CPU timings (they are shared machines)."""
    try:
        with open("/proc/loadavg") as f:
            return f"load average {' '.join(f.read().split()[:3])} on {os.cpu_count()} cores"
    except OSError:
        return ""
