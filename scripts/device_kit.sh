#!/usr/bin/env bash
# The GPU lease kit, made on this machine (no GPU needed): builds unet_ext._C against the GPU
# machine's torch (2.11.0, CUDA 13.0: its PyPI build is the same build) for sm_90a (the H200) in a
# venv of its own, and writes to DIR what a lease needs and nothing more:
#   DIR/lib/unet_ext/_C.abi3.so   the library (Python-agnostic: this Python 3.11 build loads in 3.12)
#   DIR/run.sh                    the run on the GPU machine (scripts/device_run.sh)
#   DIR/wheels/                   nvidia-cutlass and ninja (a fallback build there), pytest-timeout
#   DIR/kit.env                   what was built: torch, arch, commit, the venv (for --dry-run)
# DIR must be inside the repository and git-ignored (default .kit) so that `carry` can take it.
# It ends by printing the device call to make. Usage: bash scripts/device_kit.sh [DIR]
# Environment: UNET_EXT_KIT_VENV (default ~/.cache/unet_ext/kit-torch2.11.0), MAX_JOBS.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
KIT=${1:-.kit}
mkdir -p "$KIT"
KIT=$(cd "$KIT" && pwd)
case "$KIT" in
  "$ROOT"/*) ;;
  *) echo "device_kit: DIR must be inside the repository ($ROOT), so that the device call can carry it" >&2; exit 2 ;;
esac
KIT_REL=${KIT#"$ROOT"/}
if ! git check-ignore -q "$KIT_REL"; then
  echo "device_kit: $KIT_REL is not git-ignored; add it to .gitignore (the kit's files must not be committed)" >&2
  exit 2
fi

TORCH_VERSION=2.11.0   # the GPU machine's torch (DEVELOPERS.md, ../shared/DEVICE-FACTS.md)
ARCH=9.0a              # H200 / H100: sm_90a, whose wgmma/TMA kernels need the "a"
CUTLASS_VERSION=4.2.0.0
VENV=${UNET_EXT_KIT_VENV:-$HOME/.cache/unet_ext/kit-torch$TORCH_VERSION}
PY=$VENV/bin/python
start=$SECONDS
step() { echo "device_kit: $* ($((SECONDS - start)) s)" >&2; }

if ! "$PY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null ||
   ! "$PY" -c "import numpy, ninja, pytest, pytest_timeout, hypothesis, scipy, tifffile, PIL, tqdm, matplotlib, cutlass_library" 2>/dev/null; then
  step "venv $VENV with torch==$TORCH_VERSION (about a minute and 5 GB)"
  [ -x "$PY" ] || python3 -m venv "$VENV"
  "$PY" -m pip install --quiet --disable-pip-version-check "torch==$TORCH_VERSION" numpy ninja pytest \
    pytest-timeout hypothesis scipy tifffile pillow tqdm matplotlib "nvidia-cutlass==$CUTLASS_VERSION"
fi
# The real toolkit folder: nvcc on PATH may be a wrapper script (its --dryrun names TOP=).
if [ -z "${CUDA_HOME:-}" ]; then
  probe=$(mktemp --suffix=.cu)
  CUDA_HOME=$(nvcc --dryrun -c "$probe" -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
  rm -f "$probe"
  export CUDA_HOME
fi

step "building for $ARCH against torch $TORCH_VERSION (incremental: build/kit-torch$TORCH_VERSION-sm90a)"
rm -rf "$KIT/lib"
FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=$ARCH MAX_JOBS=${MAX_JOBS:-$(nproc)} \
  "$PY" setup.py --quiet build_ext --build-lib "$KIT/lib" --build-temp "build/kit-torch$TORCH_VERSION-sm90a" >&2
LIB=$KIT/lib/unet_ext/_C.abi3.so
[ -f "$LIB" ] || { echo "device_kit: the build did not produce $LIB" >&2; exit 1; }
find "$KIT/lib" -type f ! -name '_C.abi3.so' -delete
# Host debug info is of no use there; the device code keeps its -lineinfo.
strip --strip-debug "$LIB"
step "checking that the library loads in torch $TORCH_VERSION and has the tensor-core kernels"
UNET_EXT_LIBRARY=$LIB "$PY" - <<'PY'
import sys
import unet_ext
info = unet_ext.build_info()
print("device_kit:", info, file=sys.stderr)
if not (info["cuda_kernels"] and info["cutlass_sm80"] and info["cutlass_sm90a"]):
    sys.exit("device_kit: the kit's library lacks CUDA, CUTLASS sm_80 or sm_90a kernels")
PY

step "wheels for a fallback build on the GPU machine (Python 3.12)"
rm -rf "$KIT/wheels"
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$KIT/wheels" "nvidia-cutlass==$CUTLASS_VERSION" ninja pytest-timeout
cp scripts/device_run.sh "$KIT/run.sh"
commit=$(git rev-parse --short HEAD)
dirty=$(git status --porcelain --untracked-files=no | grep -q . && echo "+changes" || true)
cat >"$KIT/kit.env" <<EOF
KIT_TORCH=$TORCH_VERSION
KIT_ARCH=$ARCH
KIT_COMMIT=$commit$dirty
KIT_BUILT=$(date -u +%Y-%m-%dT%H:%M:%SZ)
KIT_VENV=$VENV
EOF

size_mb=$(du -sm "$KIT" | cut -f1)
if [ "$size_mb" -ge 48 ]; then
  echo "device_kit: $KIT_REL is $size_mb MiB; it must stay under 48 MiB (the call carries 64 MiB with the tree)" >&2
  exit 1
fi
tree_mb=$(git ls-files -co --exclude-standard -z | du -cm --files0-from=- 2>/dev/null | tail -n 1 | cut -f1)
step "kit ready: $KIT_REL, $size_mb MiB (working tree $tree_mb MiB; 64 MiB travel in all)"
last=benchmarks/results/device-runs.md
cat <<EOF

The device call (one call; the run keeps itself under 8 minutes and exits 0 even when a step fails):
  run(command="bash $KIT_REL/run.sh", carry=["$KIT_REL"], timeout_s=600)
Then read summary.md under files_at; commit summary.md and results.json under benchmarks/results/.
Dry run here first: bash $KIT_REL/run.sh --dry-run
Last full run on a GPU: $( [ -f "$last" ] && tail -n 1 "$last" || echo "none yet (no CUDA kernel of unet_ext has run on a GPU)")
EOF
