#!/usr/bin/env bash
# Puts the wheels a GPU machine without internet needs into wheels/ (gitignored): carry that
# folder to the machine, and scripts/setup.sh / benchmarks/gpu_check.sh install from it.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip download --quiet --no-deps -d wheels nvidia-cutlass==4.2.0.0 stardist
# The workflow's pure-Python/binary dependencies, for the device's Python (check its version).
python -m pip download --quiet -d wheels tifffile scipy pillow tqdm matplotlib || true
ls -l wheels
