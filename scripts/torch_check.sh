#!/usr/bin/env bash
# Builds unet_ext against another torch and runs the CPU tests with it, beside the main build:
# a venv of its own (UNET_EXT_TORCH_VENV, default ~/.cache/unet_ext/torch<VERSION>), a CPU-only
# library in build/torch<VERSION>/ loaded through UNET_EXT_LIBRARY. CI runs it for the newest
# release; the GPU machine's torch (2.11.0) is covered by the lease kit's dry run.
# Usage: bash scripts/torch_check.sh VERSION [pytest args...]   (default args: the CPU tests)
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: $0 VERSION [pytest args...]" >&2; exit 2; }
VERSION=$1
shift
VENV=${UNET_EXT_TORCH_VENV:-$HOME/.cache/unet_ext/torch$VERSION}
PY=$VENV/bin/python
start=$SECONDS
if ! "$PY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$VERSION')" 2>/dev/null ||
   ! "$PY" -c "import numpy, ninja, pytest, pytest_timeout, hypothesis, scipy, tifffile, PIL, tqdm, matplotlib" 2>/dev/null; then
  echo "torch_check: venv $VENV with torch==$VERSION" >&2
  [ -x "$PY" ] || python3 -m venv "$VENV"
  # The machine's pip config may cap torch at the release on its disk: ask PyPI directly.
  PIP_CONFIG_FILE=/dev/null "$PY" -m pip install --quiet --disable-pip-version-check "torch==$VERSION" numpy \
    ninja pytest pytest-timeout hypothesis scipy tifffile pillow tqdm matplotlib
fi
LIB_DIR=build/torch$VERSION
rm -rf "$LIB_DIR/lib"
echo "torch_check: CPU build against torch $VERSION ($((SECONDS - start)) s)" >&2
env -u FORCE_CUDA MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py --quiet build_ext --build-lib "$LIB_DIR/lib" \
  --build-temp "$LIB_DIR/temp" >&2
[ $# -gt 0 ] || set -- -q -m "not cuda and not slow" tests
echo "torch_check: tests with torch $VERSION ($((SECONDS - start)) s): $*" >&2
# The package from this tree (also in subprocesses that tests start elsewhere), this build's library.
PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} UNET_EXT_LIBRARY=$PWD/$LIB_DIR/lib/unet_ext/_C.abi3.so \
  "$PY" -m pytest -p no:cacheprovider "$@"
echo "torch_check: torch $VERSION passed in $((SECONDS - start)) s" >&2
