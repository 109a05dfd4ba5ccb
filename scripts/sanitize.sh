#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer over the CPU code: copies the tracked sources
# into build-sanitize/src (so the normal in-place build is untouched), builds the CPU-only
# library there with UNET_EXT_SANITIZE=address,undefined (-O1 -g, any UB report fatal) and runs
# the op tests on it with libasan and libstdc++ preloaded (python itself is not instrumented and
# does not link libstdc++: without it first, ASan's __cxa_throw interceptor finds no real
# __cxa_throw at start-up and every C++ exception, torch's own included, dies in a CHECK). Leak
# checking is off because CPython does not free everything at exit. Reports go to files in
# build-sanitize/reports (pytest's capture would swallow them with the process); any report, from
# pytest or a subprocess of a test, fails the script.
#   bash scripts/sanitize.sh [pytest args]   (default: the CPU op and runtime tests)
# Cost on the 2-core CI machine: see README.md ("Hunting tests").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
root=$PWD
work=$root/build-sanitize/src
mkdir -p "$work"
start=$(date +%s)
# The tracked files as they are in the working tree (edits included), not the last commit.
git ls-files -z --cached --others --exclude-standard | grep -zv '^benchmarks/results/' |
  tar --null --ignore-failed-read -T - -cf - | tar -xf - -C "$work"
cd "$work"
export UNET_EXT_SANITIZE=address,undefined FORCE_CUDA=0 MAX_JOBS=${MAX_JOBS:-2}
echo "sanitize: building in $work" >&2
CUDA_VISIBLE_DEVICES="" "$PYTHON" setup.py build_ext --inplace > "$root/build-sanitize/build.log" 2>&1 ||
  { tail -30 "$root/build-sanitize/build.log"; exit 1; }
built=$(date +%s)
asan=$(gcc -print-file-name=libasan.so)
stdcxx=$(gcc -print-file-name=libstdc++.so)
reports=$root/build-sanitize/reports
rm -rf "$reports" && mkdir -p "$reports"
if [ $# -eq 0 ]; then
  set -- tests/test_crop_concat.py tests/test_max_pool.py tests/test_weighted_cross_entropy.py \
         tests/test_conv.py tests/test_conv_concat.py tests/test_winograd.py tests/test_properties.py tests/test_cpu_runtime.py \
         -m "not cuda" -k "not compile and not opcheck"
fi
echo "sanitize: pytest $*" >&2
status=0
LD_PRELOAD="$asan $stdcxx" \
ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:allocator_may_return_null=1:log_path=$reports/asan \
UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:log_path=$reports/ubsan \
CUDA_VISIBLE_DEVICES="" "$PYTHON" -m pytest -q -p no:cacheprovider "$@" || status=$?
if compgen -G "$reports/*" > /dev/null; then
  for f in "$reports"/*; do echo "== $f" >&2; head -60 "$f" >&2; done
  echo "sanitize: $(ls "$reports" | wc -l) report(s) in $reports" >&2
  exit 1
fi
[ "$status" -eq 0 ] || exit "$status"
echo "sanitize: passed (build $((built - start)) s, tests $(( $(date +%s) - built )) s)" >&2
