"""Shared fixtures: tiny models built from configs (no downloads), so the suite runs offline in minutes."""

from __future__ import annotations

import os
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")

from tiny_models import tiny_model  # noqa: E402

import peft_hft  # noqa: E402,F401  (registers HFT with PEFT)


def pytest_collection_modifyitems(config, items):
    """The long fuzz runs (``@pytest.mark.fuzz``) run only when selected: ``pytest -m fuzz``. The default run has the
    same properties with fewer cases (tests/format/test_fuzz_adapters.py)."""
    if "fuzz" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="many-case fuzz run: select it with -m fuzz")
    for item in items:
        if item.get_closest_marker("fuzz") is not None:
            item.add_marker(skip)


@pytest.fixture
def llama():
    return tiny_model("llama")
