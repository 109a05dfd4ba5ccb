#!/usr/bin/env bash
# Sets up unet_ext in the current Python environment and builds the extension in place.
# Keeps an installed torch (the GPU machines have their own, offline); otherwise installs
# torch==2.14.1 (the CUDA build). CUDA kernels are built when torch has CUDA and a GPU is
# present, or when FORCE_CUDA=1 (CI); see setup.py for the other build switches.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
pip_install() { "$PYTHON" -m pip install --quiet --disable-pip-version-check "$@"; }

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  echo "setup: installing torch==2.14.1" >&2
  pip_install torch==2.14.1
fi
# Build, test and workflow dependencies (module:pip name); a local wheels/ folder serves machines
# without internet.
deps=(ninja:ninja numpy:numpy tqdm:tqdm matplotlib:matplotlib pytest:pytest scipy:scipy
      tifffile:tifffile PIL:pillow hypothesis:hypothesis)
missing=$("$PYTHON" - "${deps[@]}" <<'PY'
import importlib.util, sys
print(" ".join(d.split(":")[1] for d in sys.argv[1:] if importlib.util.find_spec(d.split(":")[0]) is None))
PY
)
if [ -n "$missing" ]; then
  echo "setup: installing $missing" >&2
  if [ -d wheels ]; then
    # shellcheck disable=SC2086
    pip_install --no-index --find-links wheels $missing || pip_install $missing
  else
    # shellcheck disable=SC2086
    pip_install $missing
  fi
fi
# The default training data: the 512x512 nuclei image shipped in the stardist wheel (only its
# data files are used, so none of its dependencies).
if ! "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('stardist') is None)"; then
  echo "setup: installing stardist (data files only, --no-deps)" >&2
  if [ -d wheels ]; then
    pip_install --no-index --find-links wheels --no-deps stardist || pip_install --no-deps stardist || true
  else
    pip_install --no-deps stardist || echo "setup: stardist not installed: unet-ext train needs a data folder" >&2
  fi
fi

# CUTLASS headers (the nvidia-cutlass wheel) for the tensor-core conv kernels, when CUDA
# kernels will be built; wheels/ (scripts/fetch_wheels.sh) serves machines without internet.
wants_cuda=$("$PYTHON" -c "import os, torch; print(int(os.environ.get('FORCE_CUDA', '0') == '1' or torch.cuda.is_available()))")
if [ "$wants_cuda" = 1 ] && ! "$PYTHON" -c "import cutlass_library" 2>/dev/null; then
  echo "setup: installing nvidia-cutlass" >&2
  if [ -d wheels ]; then
    pip_install --no-index --find-links wheels --no-deps nvidia-cutlass || pip_install --no-deps nvidia-cutlass
  else
    pip_install --no-deps nvidia-cutlass
  fi
fi

echo "setup: building unet_ext (FORCE_CUDA=${FORCE_CUDA:-0})" >&2
"$PYTHON" -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e .
"$PYTHON" -c "import unet_ext; print('setup: unet_ext ready:', unet_ext.build_info())"
