# safedl_ext — the two commands that do all set-up on a fresh machine:
#   make demo   main job: plant a backdoor, train a CNN, scan it; then scan a clean one
#   make test   lint + the whole test suite on the native build (SAFEDL_REQUIRE_NATIVE=1)
# Set VENV to keep the environment elsewhere (CI caches it outside the clone).

VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
CUDA_VENV ?= $(HOME)/.cache/safedl_ext/venv-cuda
CUDA_TORCH_SPEC ?= torch==2.14.1
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup build demo test lint bench bench-linalg bench-gradients bench-defenses bench-scan bench-neutralize cuda-check cmake-test asan-test gpu-check clean

setup:
	scripts/setup-venv.sh $(VENV) $(TORCH_SPEC)

build: setup

demo: setup
	$(PY) -m safedl_ext demo --out runs/scan-demo

lint: setup
	$(VENV)/bin/ruff check safedl_ext tests bench examples setup.py

test: setup lint
	SAFEDL_REQUIRE_NATIVE=1 $(PY) -m pytest tests $(PYTEST_ARGS)

bench: setup
	SAFEDL_REQUIRE_NATIVE=1 SAFEDL_BENCH_IMAGENET=1 $(PY) -m pytest bench -q \
		--benchmark-json=bench/results/cpu-raw.json
	$(PY) bench/summarize.py bench/results/cpu-raw.json --out bench/results/cpu.json \
		--markdown bench/results/cpu.md

# Issue 3 only: streamed SVD (CIFAR- and ImageNet-shaped) and batched GMM (~15 min).
bench-linalg: setup
	SAFEDL_REQUIRE_NATIVE=1 SAFEDL_BENCH_IMAGENET=1 $(PY) -m pytest bench/test_bench_svd.py \
		bench/test_bench_gmm.py -q --benchmark-json=bench/results/linalg-cpu-raw.json
	$(PY) bench/summarize.py bench/results/linalg-cpu-raw.json \
		--out bench/results/linalg-cpu.json --markdown bench/results/linalg-cpu.md

# Issue 4 only: input gradients of all labels vs K passes, the native xent seed op (~3 min).
# Issue 4: one training step of JARN vs standard vs PGD-AT7 (MNIST CNN, ResNet-18; ~5 min).
bench-defenses: setup
	SAFEDL_REQUIRE_NATIVE=1 $(PY) -m pytest bench/test_bench_defenses.py -q \
		--benchmark-json=bench/results/defenses-cpu-raw.json
	$(PY) bench/summarize.py bench/results/defenses-cpu-raw.json \
		--out bench/results/defenses-cpu.json --markdown bench/results/defenses-cpu.md

bench-gradients: setup
	SAFEDL_REQUIRE_NATIVE=1 $(PY) -m pytest bench/test_bench_gradients.py -q \
		--benchmark-json=bench/results/gradients-cpu-raw.json
	$(PY) bench/summarize.py bench/results/gradients-cpu-raw.json \
		--out bench/results/gradients-cpu.json --markdown bench/results/gradients-cpu.md

# Issue 12: the backdoor scan vs one gradient pass and a plain implementation, AC/SS vs
# IBM ART, peak memory at 5,000 vs 50,000 images (~10 min; the ART rows skip unless
# adversarial-robustness-toolbox is installed in the venv).
SCAN_DATE ?= $(shell date +%Y-%m-%d)
bench-scan: setup
	SAFEDL_REQUIRE_NATIVE=1 $(PY) -m pytest bench/test_bench_scan.py -q \
		--benchmark-json=bench/results/scan-cpu-$(SCAN_DATE)-raw.json
	$(PY) bench/summarize.py bench/results/scan-cpu-$(SCAN_DATE)-raw.json \
		--out bench/results/scan-cpu-$(SCAN_DATE).json \
		--markdown bench/results/scan-cpu-$(SCAN_DATE).md

# Issue 13: scan + neutralization set + one retraining epoch vs one training epoch (~5 min).
NEU_DATE ?= $(shell date +%Y-%m-%d)
bench-neutralize: setup
	SAFEDL_REQUIRE_NATIVE=1 $(PY) -m pytest bench/test_bench_neutralize.py -q \
		--benchmark-json=bench/results/neutralize-cpu-$(NEU_DATE)-raw.json
	$(PY) bench/summarize.py bench/results/neutralize-cpu-$(NEU_DATE)-raw.json \
		--out bench/results/neutralize-cpu-$(NEU_DATE).json \
		--markdown bench/results/neutralize-cpu-$(NEU_DATE).md

# Compile and link the CUDA kernels against a CUDA build of torch; no GPU needed.
cuda-check:
	scripts/setup-cuda-venv.sh $(CUDA_VENV) $(CUDA_TORCH_SPEC)
	PYTHON=$(CUDA_VENV)/bin/python scripts/check-cuda-build.sh build-cuda

# The same csrc/ through CMake against libtorch, with the C++ tests (ctest).
cmake-test: setup
	PYTHON=$(PY) scripts/cmake-test.sh build-cmake

asan-test: setup
	SAFEDL_SANITIZE=1 PYTHON=$(PY) scripts/cmake-test.sh build-asan

# On a machine with a GPU: build, CUDA tests, GPU benchmarks -> bench/results/gpu-*.json
gpu-check:
	scripts/gpu-check.sh

clean:
	rm -rf build build-cuda build-cmake build-asan safedl_ext/_C*.so *.egg-info
