"""Small datasets, trainer settings and checks shared by the TRL tests (tiny models, CPU, a few steps)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from tiny_models import clone_state

PREFIX = "base_model.model."


def sft_rows(n: int = 8) -> list[dict[str, Any]]:
    return [
        {
            "prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}],
            "completion": [{"role": "assistant", "content": f"It is {2 * i}."}],
        }
        for i in range(n)
    ]


def preference_rows(n: int = 8) -> list[dict[str, Any]]:
    return [
        {
            "prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}],
            "chosen": [{"role": "assistant", "content": f"It is {2 * i}."}],
            "rejected": [{"role": "assistant", "content": f"Maybe {2 * i + 1}, or so."}],
        }
        for i in range(n)
    ]


def trl_args(config_cls, tmp_path, **overrides):
    """A TRL config for a few deterministic fp32 CPU steps, no logging, saving or checkpointing."""
    kwargs: dict[str, Any] = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,
        gradient_checkpointing=False,
        logging_steps=1000,
        seed=0,
    )
    kwargs.update(overrides)
    return config_cls(**kwargs)


def sft_trainer(model, tmp_path, peft_config=None, callbacks=None, **overrides):
    """TRL's SFTTrainer on :func:`sft_rows` with a fresh tiny tokenizer (TRL may add tokens to it)."""
    from datasets import Dataset
    from tiny_tokenizer import build_tokenizer
    from trl import SFTConfig, SFTTrainer

    return SFTTrainer(model=model, args=trl_args(SFTConfig, tmp_path, **overrides),
                      train_dataset=Dataset.from_list(sft_rows()), processing_class=build_tokenizer(),
                      peft_config=peft_config, callbacks=callbacks)


def dpo_trainer(model, tmp_path, peft_config=None, callbacks=None, **overrides):
    """TRL's DPOTrainer on :func:`preference_rows`, no reference model given."""
    from datasets import Dataset
    from tiny_tokenizer import build_tokenizer
    from trl import DPOConfig, DPOTrainer

    return DPOTrainer(model=model, ref_model=None, args=trl_args(DPOConfig, tmp_path, **overrides),
                      train_dataset=Dataset.from_list(preference_rows()), processing_class=build_tokenizer(),
                      peft_config=peft_config, callbacks=callbacks)


def selection(peft_model, adapter: str = "default") -> set[str]:
    return set(peft_model.peft_config[adapter].selected_parameters)


def trainable(peft_model) -> set[str]:
    return {n.removeprefix(PREFIX) for n, p in peft_model.named_parameters() if p.requires_grad}


def changed(before: dict[str, torch.Tensor], model) -> set[str]:
    """Parameters of ``model`` (by ``named_parameters`` name, tied weights once) that differ from ``before``."""
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


def snapshot(model) -> dict[str, torch.Tensor]:
    return clone_state(model)


def completion_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed log-probabilities of the completion tokens (TRL's DPO reference quantity), from a plain forward."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["input_ids"][:, 1:]
    mask = batch["completion_mask"][:, 1:].bool()
    logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return (logps * mask).sum(dim=1)


def reference_passes_see(monkeypatch, expected: dict[str, torch.Tensor], model) -> list[bool]:
    """Record, for every reference pass TRL makes, whether the weights then equal ``expected``."""
    import trl.trainer.dpo_trainer as dpo_module

    seen = []
    original = dpo_module.use_adapter

    @contextlib.contextmanager
    def checking(peft_model, adapter_name):
        with original(peft_model, adapter_name):
            seen.append(all(torch.equal(p.detach(), expected[n]) for n, p in model.named_parameters()))
            yield

    monkeypatch.setattr(dpo_module, "use_adapter", checking)
    return seen
