"""Half-reset: a fully fine-tuned model with half of its tensors reset to the base, as an HFT adapter (function and
`peft-hft half-reset`)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from tiny_models import clone_state, tiny_model, train_steps

from peft_hft import HFTConfig
from peft_hft.cli.main import main
from peft_hft.format.keys import parameter_name_of
from peft_hft.ops.half_reset import half_reset
from peft_hft.tuner.selection import resolve_selection


@pytest.fixture
def fft_pair():
    """(base state, fully fine-tuned model): every tensor of the fine-tuned model differs from the base."""
    base = clone_state(tiny_model("llama", layers=2))
    finetuned = tiny_model("llama", layers=2)
    for param in finetuned.parameters():
        param.requires_grad_(True)
    train_steps(finetuned, steps=2, lr=1e-2)
    finetuned_state = finetuned.state_dict()
    assert all(not torch.equal(finetuned_state[n], base[n]) for n in base)
    return base, finetuned


def test_half_reset_keeps_exactly_the_selected_tensors(fft_pair, tmp_path):
    base, finetuned = fft_pair
    config = HFTConfig(seed=3)
    selected = set(resolve_selection(tiny_model("llama", layers=2), HFTConfig(seed=3)))
    peft_model = half_reset(finetuned, tiny_model("llama", layers=2), config)
    assert set(peft_model.peft_config["default"].selected_parameters) == selected
    tuned = finetuned.state_dict()
    live = peft_model.get_base_model().state_dict()
    for name in base:
        assert torch.equal(live[name], tuned[name] if name in selected else base[name]), name
    peft_model.save_pretrained(tmp_path / "adapter")
    diffs = {parameter_name_of(k): v for k, v in load_file(tmp_path / "adapter" / "adapter_model.safetensors").items()}
    assert set(diffs) == selected  # the adapter touches exactly the kept tensors
    for name, diff in diffs.items():
        assert torch.equal(diff, tuned[name] - base[name])
    with peft_model.disable_adapter():
        assert all(torch.equal(peft_model.get_base_model().state_dict()[n], base[n]) for n in base)
    reloaded = PeftModel.from_pretrained(tiny_model("llama", layers=2), tmp_path / "adapter").merge_and_unload()
    for name in base:
        torch.testing.assert_close(reloaded.state_dict()[name], live[name], rtol=0, atol=1e-6)


def test_half_reset_follows_the_strategy(fft_pair):
    base, finetuned = fft_pair
    peft_model = half_reset(finetuned, tiny_model("llama", layers=2), HFTConfig(strategy="layer", seed=1))
    kept = peft_model.peft_config["default"].selected_parameters
    assert kept == resolve_selection(tiny_model("llama", layers=2), HFTConfig(strategy="layer", seed=1))
    blocks = {n.split(".")[2] for n in kept if n.startswith("model.layers.")}
    assert len(blocks) == 1  # one of the two blocks kept whole, the other reset


def test_half_reset_refuses_a_model_of_another_shape(fft_pair):
    _, finetuned = fft_pair
    with pytest.raises(ValueError, match="does not fit the base"):
        half_reset(finetuned, tiny_model("llama", layers=3))
    with pytest.warns(UserWarning, match="equals the base on every kept tensor"):
        half_reset(tiny_model("llama", layers=2), tiny_model("llama", layers=2))


def test_cli_half_reset(fft_pair, tmp_path, capsys):
    base, finetuned = fft_pair
    tiny_model("llama", layers=2).save_pretrained(tmp_path / "base")
    finetuned.save_pretrained(tmp_path / "ft")
    status = main([
        "half-reset", str(tmp_path / "ft"), str(tmp_path / "base"), str(tmp_path / "adapter"),
        "--merged", str(tmp_path / "merged"), "--seed", "5", "--quiet",
    ])
    assert status == 0
    out = capsys.readouterr().out
    assert "Wrote the half-reset adapter" in out and "Wrote the half-reset model" in out
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "HFT"
    selected = set(config["selected_parameters"])
    assert selected == set(resolve_selection(tiny_model("llama", layers=2), HFTConfig(seed=5)))
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    tuned = finetuned.state_dict()
    for name in base:
        if name in selected:  # base + (tuned - base): the fine-tuned values up to float32 rounding
            torch.testing.assert_close(merged[name], tuned[name], rtol=0, atol=1e-6)
        else:
            assert torch.equal(merged[name], base[name]), name
    # the CLI and the function keep the same half
    in_memory = half_reset(finetuned, tiny_model("llama", layers=2), HFTConfig(seed=5))
    assert set(in_memory.peft_config["default"].selected_parameters) == selected
    assert main(["half-reset", str(tmp_path / "ft"), str(tmp_path / "base"), str(tmp_path / "adapter")]) == 1
    assert "already exists" in capsys.readouterr().err
