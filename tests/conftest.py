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


@pytest.fixture
def llama():
    return tiny_model("llama")
