# The kernel developer's daily loop (README, "Developing kernels"): edit one kernel, rebuild only
# what changed, run that op's tests and benchmark, compare with the last run. Each target is one
# plain command (printed as it runs), so it also works without make.
#   make build [CUDA=1 ARCH=9.0a] [JOBS=2]   incremental in-place build (ninja): unet_ext/_C.abi3.so
#   make test OP=conv                        tests/test_conv*.py     (OP: crop_concat, conv, max_pool,
#   make bench OP=conv [CASE=64x130]         benchmarks, that op     weighted_cross_entropy, unet, ...)
#   make loop OP=conv                        build + test + bench (+ compare with the previous bench)
#   make kernels                             registers / smem / spills / HMMA per CUDA kernel (cuobjdump)
#   make compare OLD=a.json NEW=b.json       per-case ratio changes, noise band, regressions
#   make dev-loss / dev-conv [DEVICE=cuda]   the dev/ workshops: variants, validation, sweep, table
#   make dev-kit [KIT=.kit]                  the CUDA variants prebuilt (sm_90a) for the GPU lease kit
#   make cmake [CUDA=1 ARCH=9.0a]            the same library with CMake (build-cmake/), for clangd
# CPU-only and CUDA builds keep their objects apart (build/temp.* and build/cuda-<arch>), so
# switching between them relinks instead of recompiling.
PYTHON ?= python
JOBS ?= 2
CUDA ?= 0
ARCH ?= 9.0a
OP ?=
QUICK ?= 1
CASE ?=
DEVICE ?= cpu
BENCH_OUT ?= build/bench
CUDA_HOME ?= /usr/local/cuda-13.0
export CUDA_HOME

# Test files are named after the op family (test_max_pool.py), benchmarks after the op (max_pool2x2).
TEST_OP = $(patsubst max_pool2x2,max_pool,$(OP))
BENCH_OP = $(patsubst max_pool,max_pool2x2,$(patsubst conv2d_relu,conv,$(OP)))
TEST_FILES = $(wildcard tests/test_$(TEST_OP).py tests/test_$(TEST_OP)_*.py)
ARCH_DIR = $(subst ;,_,$(subst +,p,$(ARCH)))

ifeq ($(CUDA),1)
BUILD_ENV = FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$(ARCH)"
BUILD_TEMP = --build-temp build/cuda-$(ARCH_DIR)
CMAKE_DIR = build-cmake-cuda-$(ARCH_DIR)
CMAKE_ARGS = -DUNET_EXT_CUDA=ON -DUNET_EXT_ARCHS="$(ARCH)"
else
BUILD_ENV = FORCE_CUDA=0
BUILD_TEMP =
CMAKE_DIR = build-cmake
CMAKE_ARGS = -DUNET_EXT_CUDA=OFF
endif

KIT ?= .kit

.PHONY: help build test bench loop kernels compare dev-loss dev-conv dev-kit cmake check-op

help:
	@sed -n '1,14p' Makefile | sed 's/^# \{0,1\}//'

# --force: setuptools would skip the extension when the .so is newer than the .cpp/.cu files
# (it does not see headers, nor a CPU/CUDA switch); ninja then decides what to recompile.
build:
	$(BUILD_ENV) MAX_JOBS=$(JOBS) $(PYTHON) setup.py -q build_ext --inplace --force $(BUILD_TEMP)

check-op:
	@test -n "$(OP)" || { echo "set OP, e.g. make $(MAKECMDGOALS) OP=weighted_cross_entropy" >&2; exit 2; }

test: check-op
	@test -n "$(TEST_FILES)" || { echo "no tests/test_$(TEST_OP)*.py" >&2; exit 2; }
	$(PYTHON) -m pytest -q -x $(TEST_FILES)

# Writes to $(BENCH_OUT) (not benchmarks/results/, which holds the published runs) and compares
# with the previous run there, if any.
bench: check-op
	@prev=$$(ls -t $(BENCH_OUT)/results-*.json 2>/dev/null | head -n 1); \
	$(PYTHON) -m benchmarks.run --op $(BENCH_OP) $(if $(filter 1,$(QUICK)),--quick) $(if $(CASE),--case "$(CASE)") --device $(DEVICE) --out $(BENCH_OUT) || exit $$?; \
	new=$$(ls -t $(BENCH_OUT)/results-*.json | head -n 1); \
	if [ -n "$$prev" ] && [ "$$prev" != "$$new" ]; then echo; $(PYTHON) -m benchmarks.run --compare "$$prev" "$$new"; fi

loop: build test bench

kernels:
	$(PYTHON) -m unet_ext info --kernels

compare:
	$(PYTHON) -m benchmarks.run --compare $(OLD) $(NEW)

dev-loss:
	$(PYTHON) -m dev.loss --device $(DEVICE)

dev-conv:
	$(PYTHON) -m dev.conv --device $(DEVICE)

# The lease has no nvcc to rely on: its run finds these by content hash (dev/README.md).
dev-kit:
	DEV_CUDA_ARCH=sm_90a $(PYTHON) -m dev.loss --device cuda --build-only --build-dir $(KIT)/dev
	DEV_CUDA_ARCH=sm_90a $(PYTHON) -m dev.conv --device cuda --build-only --build-dir $(KIT)/dev

cmake:
	cmake -S . -B $(CMAKE_DIR) -G Ninja $(CMAKE_ARGS) -DPython3_EXECUTABLE=$$(command -v $(PYTHON))
	cmake --build $(CMAKE_DIR) -j $(JOBS)
	@echo "use it: UNET_EXT_LIBRARY=$$(ls $(CURDIR)/$(CMAKE_DIR)/_C*.so) $(PYTHON) -m unet_ext info"
