"""HFT -> LoRA: the converted adapter is a plain LoRA adapter; at full rank it reproduces the HFT model, below it the
reported error is the real one."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from tiny_models import batch, tiny_model

from peft_hft import HFTConfig
from peft_hft.ops.to_lora import REPORT_NAME, convert_to_lora, save_as_lora


def hft_model(tied: bool = False, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A tiny llama with a perturbed HFT adapter (embeddings, norms and half the block matrices changed)."""
    return get_peft_model(tiny_model("llama", tie_word_embeddings=tied, dtype=dtype),
                          HFTConfig(seed=seed, init_weights=False))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch(size=2, length=12)).logits.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [False, True])
def test_full_rank_lora_reproduces_the_hft_model(tmp_path, tied, dtype):
    model = hft_model(tied, dtype)
    expected = logits(model)
    report = save_as_lora(tmp_path / "lora", model, rank=64)  # >= every matrix's full rank (hidden 32, vocab 100)
    assert report.relative_error < 1e-3 and report.dropped == []
    config = PeftConfig.from_pretrained(tmp_path / "lora")
    assert isinstance(config, LoraConfig) and config.r == config.lora_alpha == 64
    assert {"model.embed_tokens", "lm_head"} <= set(config.target_modules)  # a tied head gets its own LoRA too
    assert config.modules_to_save  # the norms, stored in full
    lora = PeftModel.from_pretrained(tiny_model("llama", tie_word_embeddings=tied, dtype=dtype), tmp_path / "lora")
    assert lora.peft_config["default"].peft_type.value == "LORA"
    error = (logits(lora) - expected).abs().max().item()
    gap = (logits(tiny_model("llama", tie_word_embeddings=tied, dtype=dtype)) - expected).abs().max().item()
    assert error < (1e-5 if dtype == torch.float32 else 0.1 * gap)


def test_low_rank_error_is_reported_exactly(tmp_path):
    model = hft_model()
    config, state_dict, report = convert_to_lora(model, rank=2)
    ledger_diffs = model.base_model.ledger.diffs("default", torch.float32)
    by_name = {t.name: t for t in report.tensors}
    checked = 0
    for name, diff in ledger_diffs.items():
        module = name.rsplit(".", 1)[0]
        key = f"base_model.model.{module}"
        if f"{key}.lora_A.weight" in state_dict:
            approx = state_dict[f"{key}.lora_B.weight"] @ state_dict[f"{key}.lora_A.weight"]
        elif f"{key}.lora_embedding_A" in state_dict:
            approx = (state_dict[f"{key}.lora_embedding_B"] @ state_dict[f"{key}.lora_embedding_A"]).T
        else:
            assert by_name[name].as_ == "modules_to_save" and by_name[name].relative_error == 0
            continue
        actual = float(torch.linalg.norm(diff - approx) / torch.linalg.norm(diff))
        assert by_name[name].rank == 2 and by_name[name].relative_error == pytest.approx(actual, rel=1e-4, abs=1e-6)
        assert 0.05 < actual < 1
        checked += 1
    assert checked >= 5
    assert 0 < report.relative_error < 1
    assert report.lora_parameters() == sum(2 * sum(t.shape) for t in report.tensors if t.rank)


def test_others_drop_leaves_norms_out_and_says_so(tmp_path):
    model = hft_model()
    report = save_as_lora(tmp_path / "lora", model, rank=64, others="drop")
    norms = [n for n in model.peft_config["default"].selected_parameters if "norm" in n]
    assert norms and sorted(report.dropped) == sorted(norms)
    saved = json.loads((tmp_path / "lora" / REPORT_NAME).read_text())
    assert sorted(saved["dropped"]) == sorted(norms) and saved["relative_error"] > 0
    assert not PeftConfig.from_pretrained(tmp_path / "lora").modules_to_save


def test_embeddings_drop_leaves_the_embeddings_out_and_tie_weights_works(tmp_path):
    model = hft_model(tied=True)
    report = save_as_lora(tmp_path / "lora", model, rank=64, embeddings="drop")
    assert sorted(report.dropped) == ["lm_head.weight", "model.embed_tokens.weight"]  # one tied tensor, two modules
    config = PeftConfig.from_pretrained(tmp_path / "lora")
    assert not {"model.embed_tokens", "lm_head"} & set(config.target_modules)
    lora = PeftModel.from_pretrained(tiny_model("llama", tie_word_embeddings=True), tmp_path / "lora")
    lora.base_model.model.tie_weights()  # what lm-eval's hf model calls; LoRA on a tied embedding breaks it


def test_peft_convert_to_lora_declines_hft_as_for_any_unsupported_tuner():
    from peft import convert_to_lora as peft_convert_to_lora

    model = hft_model()
    assert model.supports_lora_conversion() is False  # a query, as PEFT's generic tests use it: it must not raise
    with pytest.raises(TypeError, match="do not support LoRA conversion"):
        peft_convert_to_lora(model, rank=4)


def test_bad_input_is_refused():
    model = hft_model()
    with pytest.raises(ValueError, match="positive integer"):
        convert_to_lora(model, rank=0)
    with pytest.raises(ValueError, match="No HFT adapter named 'other'"):
        convert_to_lora(model, rank=4, adapter_name="other")
    with pytest.raises(ValueError, match="others must be"):
        convert_to_lora(model, rank=4, others="keep")
