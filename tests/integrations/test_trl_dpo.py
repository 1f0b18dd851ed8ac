"""TRL's DPOTrainer with HFT: the reference is the frozen base reached through disable_adapter(), with no second model;
precomputed reference log-probs; a wrapped PeftModel whose reference is a copy of its adapter; SFT then DPO as two
HFT stages."""

from __future__ import annotations

import gc
import json
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_tokenizer import build_tokenizer, chat_model
from transformers import TrainerCallback
from trl_helpers import (
    changed,
    completion_logps,
    dpo_trainer,
    reference_passes_see,
    selection,
    sft_trainer,
    snapshot,
    trainable,
)

from peft_hft import HFTConfig
from peft_hft.tuner.layer import find_ledger


def ref_log_probs(trainer, batch):
    """TRL's reference log-probabilities of ``batch`` (older TRL versions take the batch only, newer ones the model too)."""
    import inspect

    if "model" in inspect.signature(trainer.compute_ref_log_probs).parameters:
        return trainer.compute_ref_log_probs(trainer.model, batch)
    return trainer.compute_ref_log_probs(batch)


def _first_batch(trainer) -> dict[str, torch.Tensor]:
    return trainer.data_collator([trainer.train_dataset[i] for i in range(4)])


def _live_models(cls: type) -> int:
    gc.collect()
    return sum(type(obj) is cls for obj in gc.get_objects())


class _CountModels(TrainerCallback):
    """Counts the live objects of the model's class (e.g. LlamaForCausalLM) at every step."""

    def __init__(self, cls: type):
        self.cls, self.counts = cls, []

    def on_step_end(self, args, state, control, **kwargs):
        self.counts.append(_live_models(self.cls))


def test_dpo_reference_is_the_untouched_base_and_no_second_model_exists(tmp_path, monkeypatch):
    model = chat_model(build_tokenizer())
    base = snapshot(model)
    trainer = dpo_trainer(model, tmp_path, HFTConfig(seed=1), max_steps=3)
    batch = _first_batch(trainer)
    untouched = chat_model(build_tokenizer())  # an independent copy of the base, only to compute the expectation
    expected = completion_logps(untouched, batch)
    del untouched
    assert trainer.ref_model is None

    reference_weights = reference_passes_see(monkeypatch, base, model)
    counter = _CountModels(type(model))
    trainer.add_callback(counter)
    trainer.train()
    assert counter.counts == [1, 1, 1]  # the policy only: no reference copy at any step
    assert reference_weights and all(reference_weights)  # every reference pass ran on the base values
    assert changed(base, model) == selection(trainer.model) == trainable(trainer.model)

    # after training the policy has moved, yet TRL's reference log-probs are still the base model's
    ref_chosen, ref_rejected = ref_log_probs(trainer, batch)
    torch.testing.assert_close(torch.cat([ref_chosen, ref_rejected]), expected, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(completion_logps(trainer.model, batch), expected, atol=1e-3)

    trainer.save_model(str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(chat_model(build_tokenizer()), tmp_path / "adapter")
    torch.testing.assert_close(completion_logps(reloaded, batch), completion_logps(model, batch), rtol=0, atol=1e-4)


def test_precomputed_reference_log_probs_match_the_base_and_the_per_step_path(tmp_path):
    finals = []
    for precompute in (True, False):
        model = chat_model(build_tokenizer())
        base = snapshot(model)
        trainer = dpo_trainer(model, tmp_path / str(precompute), HFTConfig(seed=1), precompute_ref_log_probs=precompute)
        if precompute:
            batch = _first_batch(trainer)
            data = trainer.train_dataset
            stored = torch.tensor(data["ref_chosen_logps"][:4] + data["ref_rejected_logps"][:4])
            expected = completion_logps(chat_model(build_tokenizer()), batch)
            torch.testing.assert_close(stored, expected, rtol=1e-5, atol=1e-4)
        trainer.train()
        assert changed(base, model) == selection(trainer.model)
        finals.append(snapshot(model))
    for name in finals[0]:
        torch.testing.assert_close(finals[0][name], finals[1][name], rtol=1e-4, atol=1e-5)


def test_wrapped_peft_model_gets_a_reference_copy_of_its_adapter(tmp_path):
    """Given a PeftModel, TRL adds a "ref" adapter with the same config object and expects it to equal "default";
    HFT makes it a copy, so the reference is the adapter as passed in (here: after an SFT-like training)."""
    model = chat_model(build_tokenizer())
    base = snapshot(model)
    peft_model = get_peft_model(model, HFTConfig(seed=2))
    sft = sft_trainer(peft_model, tmp_path / "sft")
    sft.train()
    before_dpo = snapshot(model)
    assert changed(base, model) == selection(peft_model)

    with pytest.warns(UserWarning, match="starts as a copy"):
        trainer = dpo_trainer(peft_model, tmp_path / "dpo")
    assert set(peft_model.peft_config) == {"default", "ref"}
    batch = _first_batch(trainer)
    expected = completion_logps(peft_model, batch)  # the reference: the model as handed to DPO
    trainer.train()
    assert changed(before_dpo, model) == selection(peft_model)
    ref_chosen, ref_rejected = ref_log_probs(trainer, batch)
    torch.testing.assert_close(torch.cat([ref_chosen, ref_rejected]), expected, rtol=1e-5, atol=1e-4)
    with peft_model.disable_adapter():  # the base is still reachable and untouched
        assert not changed(base, model)


def test_adapter_added_with_a_fresh_config_starts_from_the_base():
    model = chat_model(build_tokenizer())
    base = snapshot(model)
    peft_model = get_peft_model(model, HFTConfig(seed=2, init_weights=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        peft_model.add_adapter("other", HFTConfig(seed=2))
    peft_model.set_adapter("other")
    assert not changed(base, model)


def test_sft_then_dpo_as_two_hft_stages(tmp_path):
    """The paper draws a fresh selection per stage: merge the SFT adapter, then start DPO with a new seed."""
    model = chat_model(build_tokenizer())
    sft = sft_trainer(model, tmp_path / "sft", HFTConfig(seed=0))
    sft.train()
    sft.save_model(str(tmp_path / "stage1"))

    stage1 = PeftModel.from_pretrained(chat_model(build_tokenizer()), tmp_path / "stage1")
    merged = stage1.merge_and_unload()
    assert find_ledger(merged) is None and not hasattr(merged, "peft_config")
    after_sft = snapshot(merged)
    trainer = dpo_trainer(merged, tmp_path / "dpo", HFTConfig(seed=1))
    batch = _first_batch(trainer)
    expected = completion_logps(merged, batch)  # stage 2's reference is the SFT model
    trainer.train()
    assert changed(after_sft, merged) == selection(trainer.model)
    ref = torch.cat(ref_log_probs(trainer, batch))
    torch.testing.assert_close(ref, expected, rtol=1e-5, atol=1e-4)
    trainer.save_model(str(tmp_path / "stage2"))

    configs = [json.loads((tmp_path / s / "adapter_config.json").read_text()) for s in ("stage1", "stage2")]
    assert [c["seed"] for c in configs] == [0, 1]
    assert configs[0]["selected_parameters"] != configs[1]["selected_parameters"]
