#!/usr/bin/env bash
# GPU check of unet_ext on a machine with a CUDA GPU and no internet (torch, nvcc preinstalled):
# versions, CUDA build for this GPU's arch, `unet_ext info`, CUDA tests, compute-sanitizer memcheck
# and racecheck on a few tests, the CUDA benchmarks. Every step runs even if one before failed;
# OUTDIR gets one log per step and summary.md (PASS/FAIL per step). Exit 1 if any step failed.
# Usage: benchmarks/gpu_check.sh OUTDIR
set -euo pipefail

if [ $# -ne 1 ]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
SUMMARY="$OUT/summary.md"
FAILED=0
{
  echo "# unet_ext gpu_check, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
  echo "| step | result | seconds | log |"
  echo "|---|---|---|---|"
} >"$SUMMARY"

record() {  # record NAME RESULT SECONDS
  echo "| $1 | $2 | $3 | $1.log |" >>"$SUMMARY"
  echo "== $1: $2" >&2
}

step() {  # step NAME COMMAND...: output to OUT/NAME.log; a failure is recorded, not fatal
  local name=$1 start=$SECONDS rc=0
  shift
  echo "== $name: $*" >&2
  echo "\$ $*" >"$OUT/$name.log"
  "$@" >>"$OUT/$name.log" 2>&1 || rc=$?
  if [ "$rc" -eq 0 ]; then
    record "$name" PASS $((SECONDS - start))
  else
    record "$name" "FAIL (exit $rc)" $((SECONDS - start))
    FAILED=1
  fi
}

# No GPU, nothing to check: say so and stop before building anything.
if ! nvidia-smi -L >/dev/null 2>&1 || ! python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  echo "gpu_check: no CUDA GPU on this machine (nvidia-smi missing or failing, or torch.cuda.is_available() is False); nothing checked" | tee "$OUT/gpu.log" >&2
  record gpu "FAIL (no CUDA GPU)" 0
  exit 1
fi

versions() {
  nvidia-smi
  nvcc --version
  python -c 'import sys, torch; print("python", sys.version.split()[0]); print("torch", torch.__version__, "CUDA", torch.version.cuda, "arch list", torch.cuda.get_arch_list())'
  python -m pip list 2>/dev/null | grep -i -E '^(torch|nvidia-cutlass|numpy|pytest) ' || true
}
step versions versions

if [ -d wheels ]; then
  step cutlass python -m pip install --no-index --no-deps --find-links wheels nvidia-cutlass
  # The workflow's dependencies (data, CLI tests), where the wheels fit this Python; best effort.
  python -m pip install --quiet --no-index --find-links wheels scipy tifffile pillow >/dev/null 2>&1 || true
  python -m pip install --quiet --no-index --no-deps --find-links wheels stardist >/dev/null 2>&1 || true
else
  record cutlass "SKIP (no wheels/ folder)" 0
fi

# Hopper as sm_90a: the wgmma/TMA conv kernels exist only for that target.
ARCH=$(python -c 'import torch; print("%d.%d%s" % (*torch.cuda.get_device_capability(), "a" if torch.cuda.get_device_capability() == (9, 0) else ""))')
step build env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" \
  python -m pip install -v --no-index --no-build-isolation --no-deps -e .
step info python -m unet_ext info
# Without CUDA kernels every CUDA test would be skipped, and "pass".
step cuda-kernels python -c 'import sys, unet_ext; sys.exit(not unet_ext.build_info()["cuda_kernels"])'
# A CPU-only test module that cannot import here (a missing workflow dependency) must not stop
# the CUDA tests from running.
step tests-cuda python -m pytest -q -m cuda --continue-on-collection-errors tests

# compute-sanitizer: next to the real nvcc (nvcc on PATH may be a wrapper script), or in CUDA_HOME.
find_sanitizer() {
  local nvcc top dir
  nvcc=$(command -v nvcc || true)
  top=""
  if [ -n "$nvcc" ]; then
    top=$(nvcc --dryrun --version 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
  fi
  for dir in "${CUDA_HOME:-}/bin" "$top" "$(dirname "$(readlink -f "${nvcc:-/nonexistent}")")" /usr/local/cuda/bin; do
    if [ -n "$dir" ] && [ -x "$dir/compute-sanitizer" ]; then
      echo "$dir/compute-sanitizer"
      return 0
    fi
  done
  command -v compute-sanitizer
}
# Copies, the loss, the pool, and the conv kernels: generic, CUTLASS sm_80 (fp16) and, on Hopper,
# the sm_90a wgmma/TMA ones.
SUBSET=(tests/test_crop_concat.py tests/test_weighted_cross_entropy.py tests/test_max_pool.py tests/test_conv_cuda.py -k
  "(float32 and ((test_forward_backward_match_reference and (contiguous-contiguous or channels_last-channels_last)) or (test_matches_reference_4d and mean and (contiguous or channels_last)) or test_paper_case_matches_unfused_mean or test_matches_stock_max_pool)) or (test_conv2d_forward_backward and float16) or test_hopper_wgmma_path_runs_and_matches")
if SANITIZER=$(find_sanitizer); then
  for tool in memcheck racecheck; do
    # No caching allocator: an out-of-bounds access inside a cached block would go unseen.
    step "sanitizer-$tool" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      "$SANITIZER" --tool "$tool" --error-exitcode 1 python -m pytest -q -m cuda -p no:cacheprovider --continue-on-collection-errors "${SUBSET[@]}"
  done
else
  echo "compute-sanitizer not found (CUDA_HOME/bin, next to nvcc, /usr/local/cuda/bin, PATH)" >"$OUT/sanitizer.log"
  record sanitizer "FAIL (compute-sanitizer not found)" 0
  FAILED=1
fi

step bench python -m benchmarks.run --device cuda --out "$OUT/bench"
{
  echo
  echo "## Benchmarks"
  echo
  grep -E '^(\||acceptance)' "$OUT/bench.log" || echo "(no table: see bench.log)"
} >>"$SUMMARY"

if [ "$FAILED" -ne 0 ]; then
  echo "gpu_check: some steps failed; see $SUMMARY" >&2
  exit 1
fi
echo "gpu_check: all steps passed; see $SUMMARY" >&2
