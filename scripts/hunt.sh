#!/usr/bin/env bash
# The longer hunt that CI does not run: 20x the property-test examples (HYPOTHESIS_PROFILE=
# thorough, random rather than CI's fixed seed), the CPU runtime tests (ISA matrix, fork, threads,
# memory) and the training stress tests. Cost on the 2-core CI machine: see README.md.
#   bash scripts/hunt.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
start=$(date +%s)
HYPOTHESIS_PROFILE=thorough "$PYTHON" -m pytest -q tests/test_properties.py tests/test_cpu_runtime.py \
  tests/test_training_stress.py "$@"
echo "hunt: passed in $(( $(date +%s) - start )) s" >&2
