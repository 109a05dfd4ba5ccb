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
# Build, test and workflow dependencies (module:pip name).
deps=(ninja:ninja numpy:numpy tqdm:tqdm matplotlib:matplotlib pytest:pytest pytest_timeout:pytest-timeout
      hypothesis:hypothesis scipy:scipy tifffile:tifffile PIL:pillow)
missing=$("$PYTHON" - "${deps[@]}" <<'PY'
import importlib.util, sys
print(" ".join(d.split(":")[1] for d in sys.argv[1:] if importlib.util.find_spec(d.split(":")[0]) is None))
PY
)
if [ -n "$missing" ]; then
  echo "setup: installing $missing" >&2
  # shellcheck disable=SC2086
  pip_install $missing
fi
# Test extras (setup.py's "test"): other projects' U-Nets for unet_ext.convert's tests and the ONNX
# export's toolchain. torch is pinned to the installed version so pip cannot move it (torchvision,
# which smp pulls in, must match it too).
extras=(segmentation_models_pytorch:segmentation-models-pytorch monai:monai onnx:onnx
        onnxscript:onnxscript onnxruntime:onnxruntime hypothesis:hypothesis)
missing_extras=$("$PYTHON" - "${extras[@]}" <<'PY'
import importlib.util, sys
print(" ".join(d.split(":")[1] for d in sys.argv[1:] if importlib.util.find_spec(d.split(":")[0]) is None))
PY
)
if [ -n "$missing_extras" ]; then
  torch_version=$("$PYTHON" -c "import torch; print(torch.__version__.split('+')[0])")
  echo "setup: installing test extras $missing_extras (torch pinned to $torch_version)" >&2
  # shellcheck disable=SC2086
  pip_install "torch==$torch_version" $missing_extras || echo "setup: test extras not installed: their tests skip" >&2
fi
# The default training data: the 512x512 nuclei image shipped in the stardist wheel (only its
# data files are used, so none of its dependencies).
if ! "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('stardist') is None)"; then
  echo "setup: installing stardist (data files only, --no-deps)" >&2
  pip_install --no-deps stardist || echo "setup: stardist not installed: unet-ext train needs a data folder" >&2
fi

# A second OpenMP runtime (Intel's libiomp5.so, the intel-openmp wheel: no Python module, a library
# in $prefix/lib) for tests/test_cpu_runtime.py's ops with another runtime loaded first.
if ! "$PYTHON" -c "import os, sys; sys.exit(not os.path.exists(os.path.join(sys.prefix, 'lib', 'libiomp5.so')))"; then
  echo "setup: installing intel-openmp" >&2
  pip_install --no-deps intel-openmp || echo "setup: intel-openmp not installed: its test skips" >&2
fi

# CUTLASS headers (the nvidia-cutlass wheel) for the tensor-core conv kernels, when CUDA
# kernels will be built (a CUDA build without them fails; the GPU lease kit carries the wheel).
wants_cuda=$("$PYTHON" -c "import os, torch; print(int(os.environ.get('FORCE_CUDA', '0') == '1' or torch.cuda.is_available()))")
if [ "$wants_cuda" = 1 ] && ! "$PYTHON" -c "import cutlass_library" 2>/dev/null; then
  echo "setup: installing nvidia-cutlass" >&2
  pip_install --no-deps nvidia-cutlass==4.2.0.0
fi

echo "setup: building unet_ext (FORCE_CUDA=${FORCE_CUDA:-0})" >&2
"$PYTHON" -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e .
"$PYTHON" -c "import unet_ext; print('setup: unet_ext ready:', unet_ext.build_info())"
