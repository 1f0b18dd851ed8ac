"""TRL's SFTTrainer with ``peft_config=HFTConfig()``: only the selection trains, and the saved adapter is HFT's."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from tiny_tokenizer import build_tokenizer, chat_model, save_tool_tokenizer
from trl_helpers import changed, selection, sft_trainer, snapshot, trainable

from peft_hft import HFTConfig
from peft_hft.format.keys import parameter_name_of

PROBE = torch.tensor([[1, 5, 9, 40, 77, 120, 200, 2]])


def _logits(model, ids=PROBE):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_sft_trains_only_the_selection_and_saves_an_hft_diff_adapter(tmp_path):
    model = chat_model(build_tokenizer())
    before = snapshot(model)
    trainer = sft_trainer(model, tmp_path, HFTConfig(seed=3, task_type="CAUSAL_LM"))
    peft_model = trainer.model
    chosen = selection(peft_model)
    # HFT wraps no module, so TRL's "adapter on lm_head" refusal does not apply, yet lm_head trains
    assert not isinstance(peft_model.get_output_embeddings(), BaseTunerLayer)
    assert "lm_head.weight" in chosen
    assert trainable(peft_model) == chosen

    trainer.train()
    assert changed(before, model) == chosen

    trainer.save_model(str(tmp_path / "adapter"))
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert {parameter_name_of(k) for k in saved} == chosen  # diffs of the selection, nothing else
    for key, diff in saved.items():
        name = parameter_name_of(key)
        torch.testing.assert_close(diff, model.get_parameter(name).detach() - before[name], rtol=0, atol=1e-6)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["seed"]) == ("HFT", 3)

    reloaded = PeftModel.from_pretrained(chat_model(build_tokenizer()), tmp_path / "adapter")
    torch.testing.assert_close(_logits(reloaded), _logits(model), rtol=0, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_chat_template_that_adds_tokens_trains_and_reloads(tmp_path, tied):
    """TRL's chat_template_path clones a template with new tokens: it resizes the embeddings and writes
    trainable_token_indices / modules_to_save=["lm_head"] into the config. HFT then trains both embedding matrices
    (even with train_embeddings=False) and saves them in full, because the new rows' base values were random."""
    model = chat_model(build_tokenizer(), tie_word_embeddings=tied)
    config = HFTConfig(seed=0, train_embeddings=False)
    trainer = sft_trainer(model, tmp_path, config, chat_template_path=str(save_tool_tokenizer(tmp_path / "tools")))
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows > len(build_tokenizer())  # the vocabulary grew
    assert config.modules_to_save == ["lm_head"]
    assert config.trainable_token_indices["embed_tokens"][0] == len(build_tokenizer())
    embeddings = {"model.embed_tokens.weight"} | (set() if tied else {"lm_head.weight"})
    assert embeddings <= selection(trainer.model) == trainable(trainer.model)

    before = snapshot(model)
    trainer.train()
    assert changed(before, model) == selection(trainer.model)
    trainer.save_model(str(tmp_path / "adapter"))
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.model.embed_tokens.weight" in saved  # in full, besides its diff

    ids = torch.tensor([[1, 5, 9, rows - 3, rows - 1, 2]])
    fresh = chat_model(build_tokenizer(), tie_word_embeddings=tied)
    with pytest.raises(ValueError, match=rf"resize_token_embeddings\({rows}\)"):
        PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    torch.manual_seed(123)  # the loader's new rows differ from the trainer's: the saved embeddings must win
    fresh.resize_token_embeddings(rows)
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids), rtol=0, atol=1e-5)
