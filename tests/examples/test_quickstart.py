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


def test_phases_record_wall_and_cpu_seconds_per_phase(quickstart, capsys):
    phases = quickstart.Phases()
    with phases("score before"):
        sum(i * i for i in range(200_000))
    with phases("score before"):  # a phase entered twice adds up
        pass
    assert set(phases.seconds) == set(phases.cpu_seconds) == {"score before"}
    assert phases.seconds["score before"] > 0 and phases.cpu_seconds["score before"] > 0
    assert "[score before:" in capsys.readouterr().out


def test_the_training_step_takes_trainer_callbacks(quickstart, tmp_path):
    import torch
    from tiny_models import batch
    from transformers import TrainerCallback

    class Steps(TrainerCallback):
        steps: list[int] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append(state.global_step)

    batches = [{**b, "labels": b["input_ids"]} for b in (batch(seed=i) for i in range(3))]
    callback = Steps()
    run = quickstart.fine_tune(tiny_model("llama", layers=2), batches, SimpleNamespace(lr=1e-3, output_dir=str(tmp_path)),
                               "fp32", "t", callbacks=[callback])
    assert callback.steps == [1, 2, 3] and run["precision"] == "fp32" and len(run["loss"]) == 3
    assert all(torch.isfinite(torch.tensor(run["loss"])))


def test_the_demo_watches_retention_while_training(quickstart, tmp_path):
    """The demo's RetentionCallback, driven by its training step: KL 0 at step 0, measured every N steps and at the
    last, perplexity increase consistent with the perplexity, and the PNG beside the other outputs."""
    import math

    import torch
    from tiny_tokenizer import build_tokenizer, chat_model

    import peft_hft

    tokenizer = build_tokenizer()
    model = chat_model(tokenizer)
    for p in model.parameters():
        p.requires_grad_(True)
    texts = ["the cat sat on the mat", "a dog ran in the park", "birds sing in the morning"]
    retention = peft_hft.RetentionCallback(every=2, texts=texts, tokenizer=tokenizer)
    ids = torch.tensor([tokenizer(texts[0]).input_ids])
    quickstart.fine_tune(model, [{"input_ids": ids, "labels": ids}] * 3, SimpleNamespace(lr=5e-2,
                         output_dir=str(tmp_path)), "fp32", "t", callbacks=[retention])
    steps = [h["step"] for h in retention.history]
    assert steps == [0, 2, 3]
    assert retention.history[0]["retention/kl_to_base"] == 0.0
    assert retention.history[-1]["retention/kl_to_base"] > 0
    base_ppl = retention.history[0]["retention/ppl"]
    for h in retention.history:
        assert math.isclose(h["retention/ppl_increase_pct"], 100 * (h["retention/ppl"] / base_ppl - 1), rel_tol=1e-6,
                            abs_tol=1e-9)
    assert (tmp_path / "retention.png").read_bytes()[:8] == PNG_SIGNATURE
