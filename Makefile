# Every target installs what it needs into .venv first (CPU torch 2.13.0 here; the same pin
# pulls the CUDA build on a GPU box). torchattacks is installed with --no-deps: its metadata
# requires torchvision, which it does not import and which has no CPU wheel.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
SUITE ?= suites/cifar10.toml
DB ?= results.db
DATA_DIR ?=
# make bench trains on the GPU; without a usable CUDA device it stops with a one-line error
# (DEVICE=cpu forces the CPU: days for cifar10.toml)
DEVICE ?= cuda
STAMP := $(VENV)/.installed-stamp

.PHONY: install test test-slow demo bench gpu-check report clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps torchattacks==3.5.1
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q

# The long tests, Ray's and submitit's local modes among them (CI runs them too).
test-slow: install
	$(PY) -m pip install -q '.[ray]'
	$(PY) -m pytest -q -m slow

demo: install
	$(PY) -m bench run --suite suites/demo.toml --db $(DB)

bench: install
	$(PY) -m bench run --suite $(SUITE) --db $(DB) --device $(DEVICE) $(if $(DATA_DIR),--data-dir $(DATA_DIR))

# One GPU, at most 8 minutes: perf train and perf eval figures, fast path vs fp32 agreement,
# written to gpu_check.md (see docs/performance.md).
gpu-check: install
	PY=$(PY) scripts/gpu_check.sh

report: install
	$(PY) -m bench report --db $(DB)

# Removes what is cheap to rebuild (report, virtualenv, caches). results.db and checkpoints/
# hold hours of training and evaluation: delete them by hand if you mean to.
clean:
	rm -rf reports $(VENV) .pytest_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
