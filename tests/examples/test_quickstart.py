"""The quickstart's pieces that do not need the real model: the selection it asks for and the plot it writes."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
from tiny_models import tiny_model

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quickstart():
    path = Path(__file__).resolve().parents[2] / "examples" / "quickstart.py"
    spec = importlib.util.spec_from_file_location("quickstart", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_random_is_the_papers_draw_and_a_strategy_calibrates(quickstart):
    model = tiny_model("llama", layers=2)
    args = SimpleNamespace(strategy="random", ratio=0.5, seed=3)
    config = quickstart.hft_config(args, model, None, [])
    assert config.selected_parameters is None and config.calibration is None and config.seed == 3
    config = quickstart.hft_config(SimpleNamespace(strategy="snr", ratio=0.5, seed=3), model, None, [])
    assert config.calibration["strategy"] == "snr" and config.selected_parameters


def test_the_plot_shows_every_model(quickstart, tmp_path):
    scores = {"new_task_acc": 50.0, "wikipedia_ppl": 150.0, "mmlu_acc_norm": 35.0}
    results = {"base model": scores, "HFT": {**scores, "new_task_acc": 75.0}, "full fine-tuning": scores}
    quickstart.plot(results, 56.0, tmp_path / "q.png")
    assert (tmp_path / "q.png").read_bytes()[:8] == PNG_SIGNATURE
