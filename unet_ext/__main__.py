"""The ``unet-ext`` command (also ``python -m unet_ext``): ``info`` says what this build contains
and what it runs on (``info --kernels``: each CUDA kernel's resources and SASS, unet_ext/_kernels.py);
``bench`` runs the repository's benchmarks/ (a source checkout only).
``train`` and ``predict`` are the paper's workflow (unet_ext/train.py, unet_ext/predict.py);
``export`` writes a training checkpoint as ONNX (unet_ext/export.py).
Subcommands are entries of COMMANDS. Bad usage prints one line and exits 2.
"""
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys

from ._cli import EXIT_USAGE, Parser


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_isa():
    """(isa, how) of the loss CPU kernels: csrc/ops/cpu/cpu_isa.cpp's rule (AVX-512 F/BW/VL/DQ
    plus the AVX2 set, else the AVX2 set: AVX2, FMA, BMI1, BMI2, F16C; else baseline;
    UNET_EXT_CPU_ISA=baseline|avx2 caps it), applied to /proc/cpuinfo (the library's own choice
    is torch.ops.unet_ext._cpu_isa(); tests check that the two agree)."""
    flags = _cpu_flags()
    avx2 = {"avx2", "fma", "bmi1", "bmi2", "f16c"}  # /proc/cpuinfo calls GCC's "bmi" bmi1
    if avx2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        isa = "avx512"
    elif avx2 <= flags:
        isa = "avx2"
    else:
        isa = "baseline"
    cap = os.environ.get("UNET_EXT_CPU_ISA")
    if cap == "baseline" or (cap == "avx2" and isa == "avx512"):
        isa = cap
    how = f"UNET_EXT_CPU_ISA={cap}" if cap else "UNET_EXT_CPU_ISA unset"
    return isa, f"{how}; from /proc/cpuinfo by the library's rule"


def _cuobjdump():
    candidates = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump"),
                  shutil.which("cuobjdump") or ""]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.join(os.path.dirname(os.path.realpath(nvcc)), "cuobjdump"))
    triton = importlib.util.find_spec("triton")  # the CUDA build of torch brings it, with cuobjdump
    if triton is not None and triton.origin:
        candidates.append(os.path.join(os.path.dirname(triton.origin), "backends", "nvidia", "bin", "cuobjdump"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def compiled_archs(library):
    """SASS/PTX archs inside our library, via cuobjdump; a sentence when that cannot be told."""
    tool = _cuobjdump()
    if tool is None:
        return "unknown (cuobjdump not found)"
    found = set()
    for kind in ("--list-elf", "--list-ptx"):
        out = subprocess.run([tool, kind, library], capture_output=True, text=True)
        found |= {f"{m}{' (ptx)' if kind == '--list-ptx' else ''}"
                  for m in re.findall(r"sm_\d+[af]?", out.stdout)}
    return ", ".join(sorted(found)) or "none found by cuobjdump"


def _huge_pages():
    """What csrc/ops/cpu/huge_pages.h does here: its switch and the kernel's THP mode."""
    if os.environ.get("UNET_EXT_HUGE_PAGES") == "0":
        return "ordinary pages (UNET_EXT_HUGE_PAGES=0)"
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = re.search(r"\[(\w+)\]", f.read()).group(1)
    except (OSError, AttributeError):
        mode = "unknown"
    if mode == "never":
        return "ordinary pages (THP is off in this kernel); freed blocks >= 2 MiB cached up to 512 MiB"
    return f">= 2 MiB in transparent huge pages, freed blocks cached up to 512 MiB (kernel THP mode: {mode})"


def info(args):
    parser = Parser(prog="unet-ext info", description="what this build contains and the device it runs on")
    parser.add_argument("--kernels", action="store_true",
                        help="per CUDA kernel: registers, shared memory, local/stack, spills, HMMA/HGMMA (cuobjdump)")
    parser.add_argument("--library", help="with --kernels: another file than the loaded library (a .so, .o, cubin)")
    parser.add_argument("--filter", help="with --kernels: only kernels whose name contains this")
    parser.add_argument("--json", action="store_true", help="with --kernels: JSON rows instead of the table")
    options = parser.parse_args(args.rest)
    if options.kernels:
        from . import _kernels

        library = options.library
        if library is None:
            import unet_ext

            library = unet_ext.build_info()["library"]
        return _kernels.main(library, _cuobjdump(), options.filter, options.json)

    import torch

    import unet_ext

    build = unet_ext.build_info()
    print(f"unet_ext {unet_ext.__version__}: {build['library']}")
    print(f"torch {torch.__version__} ({'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU-only build'})"
          + (f", torch archs: {' '.join(torch.cuda.get_arch_list())}" if torch.cuda.is_available() else ""))
    if build["cuda_kernels"]:
        print(f"CUDA kernels: compiled, archs {compiled_archs(build['library'])}")
        if build["cutlass_sm80"]:
            tf32 = "on" if torch.backends.cudnn.allow_tf32 else "off (torch.backends.cudnn.allow_tf32)"
            print("tensor cores: CUTLASS conv2d_relu/conv2d_bias/conv_transpose2x2 fprop, dgrad, wgrad "
                  f"for fp16/bf16 (sm_80+), TF32 for float32 {tf32}")
            print("Hopper: " + ("sm_90a wgmma/TMA conv2d fprop and dgrad for fp16/bf16" if build["cutlass_sm90a"]
                                else "sm_80 kernels (build with TORCH_CUDA_ARCH_LIST naming 9.0a for wgmma)"))
        else:
            print("tensor cores: none (built without nvidia-cutlass): generic CUDA kernels only")
    else:
        print("CUDA kernels: not compiled (CPU-only build)")
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        print(f"device: {torch.cuda.get_device_name()} (sm_{major}{minor}), "
              f"{torch.cuda.device_count()} GPU(s)")
    else:
        print("device: no CUDA device; CPU only")
    print(f"CPU large outputs: {_huge_pages()}")
    isa, how = cpu_isa()
    print(f"CPU: {platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; "
          f"loss kernels ISA: {isa} ({how})")
    return 0


def bench(args):
    """benchmarks/ lives at the repository root, next to the package folder, not inside it."""
    import unet_ext

    root = os.path.dirname(os.path.dirname(os.path.abspath(unet_ext.__file__)))
    if not os.path.isfile(os.path.join(root, "benchmarks", "run.py")):
        sys.stderr.write(f"unet-ext bench: no benchmarks/run.py in {root}: bench needs a source "
                         "checkout installed in place (pip install -e .)\n")
        return EXIT_USAGE
    sys.path.insert(0, root)
    from benchmarks import run

    return run.main(args.rest, prog="unet-ext bench")


def train(args):
    from . import train as command

    return command.main(args.rest, prog="unet-ext train")


def predict(args):
    from . import predict as command

    return command.main(args.rest, prog="unet-ext predict")


def export(args):
    from . import export as command

    return command.main(args.rest, prog="unet-ext export")


# name -> (help, takes the remaining arguments itself, function)
COMMANDS = {
    "train": ("train a U-Net (default: the bundled nuclei image; see `unet-ext train --help`)",
              True, train),
    "predict": ("segment images of any size with a checkpoint (see `unet-ext predict --help`)",
                True, predict),
    "export": ("write a checkpoint as ONNX of standard ops (see `unet-ext export --help`)",
               True, export),
    "info": ("print what this build contains and the device it runs on (--kernels: the CUDA kernels' "
             "registers, shared memory, spills, tensor-core instructions)", True, info),
    "bench": ("run the op benchmarks (options: see `unet-ext bench --help`)", True, bench),
}


def main(argv=None):
    parser = Parser(prog="unet-ext", description="unet_ext: fused U-Net ops for PyTorch")
    commands = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    for name, (help_text, passes_rest, _) in COMMANDS.items():
        commands.add_parser(name, help=help_text, add_help=not passes_rest)
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.error(f"a command is required: {', '.join(COMMANDS)}")
    _, passes_rest, function = COMMANDS[args.command]
    if rest and not passes_rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    return function(args)


if __name__ == "__main__":
    sys.exit(main())
