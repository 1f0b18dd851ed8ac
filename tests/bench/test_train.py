"""The benchmark's training loop: the precision it resolves and runs, and TrainerCallbacks plugged into it."""

from __future__ import annotations

import pytest
import torch
from tiny_models import batch, tiny_model
from transformers import TrainerCallback

import peft_hft.utils
from peft_hft.bench.train import train


def _batches(n: int) -> list[dict[str, torch.Tensor]]:
    return [{**b, "labels": b["input_ids"]} for b in (batch(seed=i, size=2, length=8) for i in range(n))]


def _autocast_seen(model) -> list[bool]:
    seen: list[bool] = []
    model.model.layers[0].register_forward_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
    return seen


@pytest.mark.parametrize("native, expected", [(False, "fp32"), (True, "bf16")])
def test_auto_precision_is_resolved_from_the_cpu_and_recorded(monkeypatch, native, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(peft_hft.utils, "cpu_has_native_bf16", lambda: native)
    model = tiny_model("llama", layers=2)
    seen = _autocast_seen(model)
    run = train(model, _batches(2), lr=1e-3)
    assert run["precision"] == expected and seen == [expected == "bf16"] * 2
    assert len(run["loss"]) == 2 and all(torch.isfinite(torch.tensor(run["loss"])))


def test_trainer_callbacks_see_every_step_and_can_stop_the_run():
    class Recorder(TrainerCallback):
        def __init__(self):
            self.events, self.logs = [], []

        def on_train_begin(self, args, state, control, **kwargs):
            self.events.append("begin")

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            assert model is not None and isinstance(optimizer, torch.optim.AdamW)
            self.events.append(state.global_step)
            if state.global_step == 3:
                control.should_training_stop = True
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(logs)

        def on_train_end(self, args, state, control, **kwargs):
            self.events.append("end")

    recorder = Recorder()
    run = train(tiny_model("llama", layers=2), _batches(5), lr=1e-3, precision="fp32", callbacks=[recorder])
    assert recorder.events == ["begin", 1, 2, 3, "end"] and len(run["loss"]) == 3
    assert [log["loss"] for log in recorder.logs] == pytest.approx(run["loss"])
    assert [log["step"] for log in recorder.logs] == [1, 2, 3] and recorder.logs[0]["learning_rate"] > 0
