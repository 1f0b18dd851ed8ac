"""Every other TRL trainer that takes ``peft_config`` and runs offline: with HFTConfig, exactly the selection trains.

Trainers that cannot run here (vLLM servers, LoRA-only weight sync) are listed with their reasons in docs/trl.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch
import trl
from datasets import Dataset
from tiny_models import tiny_config
from tiny_tokenizer import build_tokenizer, chat_model
from trl_helpers import changed, preference_rows, selection, sft_rows, snapshot, trainable, trl_args

from peft_hft import HFTConfig

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def _completion_length(completions, **kwargs) -> list[float]:
    """A reward that differs between sampled completions, so group-relative advantages are not all zero."""
    return [float(len(str(c))) for c in completions]


def _prompts() -> Dataset:
    return Dataset.from_list([{"prompt": r["prompt"]} for r in sft_rows()])


def _grpo(model, tok, tmp):
    # beta > 0: the KL term's reference passes go through disable_adapter()
    args = trl_args(trl.GRPOConfig, tmp, per_device_train_batch_size=2, num_generations=2, max_completion_length=6,
                    beta=0.04)
    return trl.GRPOTrainer(model=model, reward_funcs=_completion_length, args=args, train_dataset=_prompts(),
                           processing_class=tok, peft_config=HFTConfig(seed=0))


def _rloo(model, tok, tmp):
    args = trl_args(trl.RLOOConfig, tmp, per_device_train_batch_size=2, num_generations=2, max_completion_length=6)
    return trl.RLOOTrainer(model=model, reward_funcs=_completion_length, args=args, train_dataset=_prompts(),
                           processing_class=tok, peft_config=HFTConfig(seed=0))


def _kto(model, tok, tmp):
    rows = [
        {"prompt": r["prompt"], "completion": r["chosen"] if i % 2 else r["rejected"], "label": bool(i % 2)}
        for i, r in enumerate(preference_rows())
    ]
    return trl.KTOTrainer(model=model, args=trl_args(trl.KTOConfig, tmp), train_dataset=Dataset.from_list(rows),
                          processing_class=tok, peft_config=HFTConfig(seed=0))


def _distillation(model, tok, tmp):
    args = trl_args(trl.DistillationConfig, tmp, max_completion_length=6)
    return trl.DistillationTrainer(model=model, teacher_model=chat_model(tok, seed=1), args=args,
                                   train_dataset=Dataset.from_list(sft_rows()), processing_class=tok,
                                   peft_config=HFTConfig(seed=0))


def _cpo(model, tok, tmp):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    return CPOTrainer(model=model, args=trl_args(CPOConfig, tmp), train_dataset=Dataset.from_list(preference_rows()),
                      processing_class=tok, peft_config=HFTConfig(seed=0))


def _orpo(model, tok, tmp):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    return ORPOTrainer(model=model, args=trl_args(ORPOConfig, tmp), train_dataset=Dataset.from_list(preference_rows()),
                       processing_class=tok, peft_config=HFTConfig(seed=0))


def _tpo(model, tok, tmp):
    from trl.experimental.tpo import TPOConfig, TPOTrainer

    rows = [dict(r, reference=r["chosen"]) for r in preference_rows()]
    return TPOTrainer(model=model, args=trl_args(TPOConfig, tmp), train_dataset=Dataset.from_list(rows),
                      processing_class=tok, peft_config=HFTConfig(seed=0))


def _gkd(model, tok, tmp):
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    rows = [{"messages": r["prompt"] + r["completion"]} for r in sft_rows()]
    return GKDTrainer(model=model, teacher_model=chat_model(tok, seed=1),
                      args=trl_args(GKDConfig, tmp, lmbda=0.0, max_new_tokens=4), train_dataset=Dataset.from_list(rows),
                      processing_class=tok, peft_config=HFTConfig(seed=0))


def _online_dpo(model, tok, tmp):
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    args = trl_args(OnlineDPOConfig, tmp, per_device_train_batch_size=2, max_new_tokens=4)
    return OnlineDPOTrainer(model=model, reward_funcs=_completion_length, args=args, train_dataset=_prompts(),
                            processing_class=tok, peft_config=HFTConfig(seed=0))


def _gold(model, tok, tmp):
    from trl.experimental.gold import GOLDConfig, GOLDTrainer

    rows = [{"messages": r["prompt"] + r["completion"]} for r in sft_rows()]
    return GOLDTrainer(model=model, teacher_model=chat_model(tok, seed=1),
                       args=trl_args(GOLDConfig, tmp, lmbda=0.0, max_completion_length=4),
                       train_dataset=Dataset.from_list(rows), processing_class=tok, peft_config=HFTConfig(seed=0))


def _iw_opd(model, tok, tmp):
    from trl.experimental.iw_opd import IWOPDConfig, IWOPDTrainer

    teacher = tmp / "teacher"  # IW-OPD compares the teacher's tokenizer with the student's, so it wants a directory
    chat_model(tok, seed=1).save_pretrained(teacher)
    tok.save_pretrained(teacher)
    rows = [{"messages": r["prompt"] + r["completion"]} for r in sft_rows()]
    return IWOPDTrainer(model=model, teacher_model=str(teacher), args=trl_args(IWOPDConfig, tmp, max_completion_length=4),
                        train_dataset=Dataset.from_list(rows), processing_class=tok, peft_config=HFTConfig(seed=0))


def _self_distillation_rows() -> Dataset:
    return Dataset.from_list([{"prompt": r["prompt"], "privileged_context": "The answer is even."} for r in sft_rows()])


def _sdft(model, tok, tmp):
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    # the default teacher_model_kind="base" is the student with its adapter disabled
    args = trl_args(SDFTConfig, tmp, per_device_train_batch_size=2, num_generations=2, max_completion_length=4)
    return SDFTTrainer(model=model, args=args, train_dataset=_self_distillation_rows(), processing_class=tok,
                       peft_config=HFTConfig(seed=0))


def _sdpo(model, tok, tmp):
    from trl.experimental.sdpo import SDPOConfig, SDPOTrainer

    # teacher_model_kind="ema" needs a pure-LoRA student (TRL refuses others); "base" uses disable_adapter()
    args = trl_args(SDPOConfig, tmp, per_device_train_batch_size=2, num_generations=2, max_completion_length=4,
                    teacher_model_kind="base")
    return SDPOTrainer(model=model, reward_funcs=_completion_length, args=args, train_dataset=_self_distillation_rows(),
                       processing_class=tok, peft_config=HFTConfig(seed=0))


TRAINERS: dict[str, Callable] = {
    "grpo": _grpo,
    "rloo": _rloo,
    "kto": _kto,
    "distillation": _distillation,
    "experimental.cpo": _cpo,
    "experimental.orpo": _orpo,
    "experimental.tpo": _tpo,
    "experimental.gkd": _gkd,
    "experimental.online_dpo": _online_dpo,
    "experimental.gold": _gold,
    "experimental.iw_opd": _iw_opd,
    "experimental.sdft": _sdft,
    "experimental.sdpo": _sdpo,
}


def _older_trl() -> bool:
    """An older TRL than the one these rows are written for (1.16): `make test-compat` runs the floor, trl 1.0."""
    from packaging.version import Version

    return Version(trl.__version__) < Version("1.16")


def _absent_in_this_trl(exc: Exception) -> bool:
    """A trainer, config or argument this TRL version does not have (rather than a failure with HFT)."""
    text = str(exc)
    return ("module trl has no attribute" in text or "No module named 'trl." in text
            or ("unexpected keyword argument" in text and "Config.__init__" in text))


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_trainer_trains_exactly_the_hft_selection(name, tmp_path):
    tokenizer = build_tokenizer()
    model = chat_model(tokenizer)
    before = snapshot(model)
    try:
        trainer = TRAINERS[name](model, tokenizer, tmp_path)
    except (AttributeError, ModuleNotFoundError, TypeError) as exc:
        if not _older_trl() or not _absent_in_this_trl(exc):
            raise
        pytest.skip(f"{name} (or the arguments used here) is not in trl {trl.__version__}: {exc}")
    assert trainable(trainer.model) == selection(trainer.model)
    trainer.train()
    assert changed(before, model) == selection(trainer.model)


def test_reward_trainer_trains_the_selection_and_the_new_score_head(tmp_path):
    """A reward model's score head is new and random: HFT counts it as the output layer and always trains it."""
    from transformers import AutoModelForSequenceClassification

    tokenizer = build_tokenizer()
    config = tiny_config("llama", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, num_labels=1)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    before = snapshot(model)
    trainer = trl.RewardTrainer(model=model, args=trl_args(trl.RewardConfig, tmp_path),
                                train_dataset=Dataset.from_list(preference_rows()), processing_class=tokenizer,
                                peft_config=HFTConfig(seed=0))
    assert "score.weight" in selection(trainer.model) == trainable(trainer.model)
    trainer.train()
    assert changed(before, model) == selection(trainer.model)


@pytest.mark.parametrize("task_type", ["SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"])
def test_task_types_that_wrap_the_head_are_refused(task_type):
    with pytest.raises(ValueError, match="leave task_type unset"):
        HFTConfig(task_type=task_type)
