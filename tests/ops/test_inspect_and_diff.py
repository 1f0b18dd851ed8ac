"""``peft-hft inspect`` (what an adapter holds, its size against the full model) and ``peft-hft diff`` (a full
fine-tune turned into an HFT adapter); and the bf16 storage option for fp32 models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_models import batch, clone_state, tiny_model, train_steps

import peft_hft
from peft_hft.cli import main as cli
from peft_hft.format.fingerprint import BaseMismatchError, digest
from peft_hft.format.keys import diff_key
from peft_hft.ops.extract import extract_adapter
from peft_hft.ops.inspect import inspect_adapter
from peft_hft.ops.merge import merge_checkpoint
from peft_hft.tuner.selection import resolve_selection


def logits(model):
    with torch.no_grad():
        return model(**batch(0)).logits


@pytest.fixture
def adapter(tmp_path):
    base = tiny_model("llama", layers=2)
    base.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    model = get_peft_model(base, peft_hft.HFTConfig(seed=0))
    train_steps(model, steps=2)
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter", model


@pytest.fixture
def full_finetune(tmp_path):
    """BASE and TUNED checkpoints: every tensor of TUNED trained (plain full fine-tuning)."""
    base = tiny_model("llama", layers=2)
    base.save_pretrained(tmp_path / "base")
    tuned = tiny_model("llama", layers=2)
    for param in tuned.parameters():
        param.requires_grad_(True)
    train_steps(tuned, steps=2)
    tuned.save_pretrained(tmp_path / "tuned")
    return tmp_path / "base", tmp_path / "tuned", tuned


# -- inspect --------------------------------------------------------------------------------------------------------


def test_inspect_reports_sizes_ratio_selection_and_fingerprint(adapter, capsys):
    base_dir, adapter_dir, model = adapter
    info = inspect_adapter(adapter_dir, base=base_dir)
    selected = model.peft_config["default"].selected_parameters
    state = model.get_base_model().state_dict()
    expected = sum(state[n].numel() * state[n].element_size() for n in selected)
    assert info.tensor_bytes == expected  # adapter bytes == the selected tensors' bytes in the saved dtype
    assert info.file_bytes - info.tensor_bytes < 4096  # the rest is the safetensors header
    all_bytes = sum(t.numel() * t.element_size() for t in load_file_dir(base_dir).values())
    assert info.base_bytes == all_bytes
    d = info.to_dict()
    assert d["size_ratio"] == pytest.approx(expected / all_bytes)
    assert d["fingerprint"]["tensors"] == len(selected)
    assert "attention                        4       8    50.0%" in info.summary

    assert cli.main(["inspect", str(adapter_dir), "--base", str(base_dir), "--verify", "--tensors"]) == 0
    text = capsys.readouterr().out
    assert f"selection     {len(selected)} tensors" in text
    assert f"{100 * expected / all_bytes:.1f}% of the full model" in text
    assert f"base check    OK: all {len(selected)} base tensors match the fingerprint" in text
    assert f"  {selected[0]}  float32" in text


def load_file_dir(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in path.glob("*.safetensors"):
        out.update(load_file(file))
    return out


def test_inspect_verify_reports_a_mismatch_with_exit_status_1(adapter, tmp_path, capsys):
    _, adapter_dir, _ = adapter
    tiny_model("llama", layers=2, seed=4).save_pretrained(tmp_path / "other")
    assert cli.main(["inspect", str(adapter_dir), "--base", str(tmp_path / "other"), "--verify"]) == 1
    assert "base check    MISMATCH" in capsys.readouterr().out


def test_inspect_json_and_plot_and_unknown_base(adapter, tmp_path, capsys):
    base_dir, adapter_dir, _ = adapter
    png = tmp_path / "selection.png"
    assert cli.main(["inspect", str(adapter_dir), "--base", str(base_dir), "--json", "--plot", str(png)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["peft_type"] == "HFT" and report["base_bytes"] > report["tensor_bytes"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(["inspect", str(adapter_dir), "--base", str(tmp_path / "gone")]) == 0
    assert "base checkpoint not available here" in capsys.readouterr().out


def test_bf16_diffs_halve_an_fp32_adapter_within_bf16_rounding(tmp_path):
    model = tiny_model("llama", layers=2)
    base = clone_state(model)
    peft_model = get_peft_model(model, peft_hft.HFTConfig(seed=0, diff_dtype="bfloat16"))
    train_steps(peft_model, steps=3, lr=1e-2)
    tuned = clone_state(model)
    peft_model.save_pretrained(tmp_path / "bf16")
    peft_model.peft_config["default"].diff_dtype = None
    peft_model.save_pretrained(tmp_path / "fp32")
    bf16, fp32 = inspect_adapter(tmp_path / "bf16"), inspect_adapter(tmp_path / "fp32")
    assert bf16.bytes_by_dtype() == {"bfloat16": fp32.tensor_bytes // 2}

    loaded = PeftModel.from_pretrained(tiny_model("llama", layers=2), tmp_path / "bf16").get_base_model()
    state = loaded.state_dict()
    for name in peft_model.peft_config["default"].selected_parameters:
        exact = tuned[name] - base[name]
        error = (state[name] - tuned[name]).abs()
        # bf16 keeps 8 significant bits: |round(d) - d| <= 2^-8 |d|, plus one fp32 rounding of the sum
        bound = exact.abs() * 2**-8 + tuned[name].abs() * 2**-23 + 1e-12
        assert (error <= bound).all(), name
    drift = (logits(loaded) - logits(peft_model)).abs().max()
    assert 0 < drift < 1e-3


# -- diff -----------------------------------------------------------------------------------------------------------


def test_diff_of_a_full_finetune_reproduces_it(full_finetune, tmp_path):
    base_dir, tuned_dir, tuned = full_finetune
    result = extract_adapter(tuned_dir, base_dir, tmp_path / "adapter", progress=False)
    assert len(result.changed) == len(list(tuned.parameters())) and result.dropped == ()
    assert result.kept_change == 1.0 and result.selected == result.changed
    loaded = PeftModel.from_pretrained(tiny_model("llama", layers=2), tmp_path / "adapter")
    assert (logits(loaded) - logits(tuned)).abs().max() <= 1e-5
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")  # base and task type recorded
    assert (logits(auto) - logits(tuned)).abs().max() <= 1e-5
    with pytest.raises(BaseMismatchError):
        PeftModel.from_pretrained(tiny_model("llama", layers=2, seed=5), tmp_path / "adapter")
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "library_name: peft" in card and "Extracted with `peft-hft diff`" in card

    merge_checkpoint(base_dir, tmp_path / "adapter", tmp_path / "merged", progress=False)
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    for name, param in tuned.state_dict().items():
        torch.testing.assert_close(merged[name], param, rtol=0, atol=1e-6)


def test_diff_with_an_hft_selection_keeps_the_half_hft_would_train(full_finetune, tmp_path, capsys):
    base_dir, tuned_dir, tuned = full_finetune
    assert cli.main(["diff", str(tuned_dir), str(base_dir), str(tmp_path / "half"), "--ratio", "0.5", "--seed", "3",
                     "--quiet"]) == 0
    assert "left out" in capsys.readouterr().out
    config = json.loads((tmp_path / "half" / "adapter_config.json").read_text())
    expected = resolve_selection(tiny_model("llama", layers=2), peft_hft.HFTConfig(ratio=0.5, seed=3))
    assert config["selected_parameters"] == expected
    assert (config["ratio"], config["seed"], config["strategy"]) == (0.5, 3, "category")
    tensors = load_file(tmp_path / "half" / "adapter_model.safetensors")
    assert set(tensors) == {diff_key(n) for n in expected}
    base = tiny_model("llama", layers=2).state_dict()
    tuned_state = tuned.state_dict()
    loaded = PeftModel.from_pretrained(tiny_model("llama", layers=2), tmp_path / "half").get_base_model().state_dict()
    for name, value in loaded.items():
        want = tuned_state[name] if name in expected else base[name]
        torch.testing.assert_close(value, want, rtol=0, atol=1e-6)


def test_diff_with_explicit_parameters_and_a_parameters_file(full_finetune, tmp_path):
    base_dir, tuned_dir, _ = full_finetune
    names = ["model.layers.0.mlp.up_proj.weight", "lm_head.weight"]
    assert cli.main(["diff", str(tuned_dir), str(base_dir), str(tmp_path / "a"), "--parameters", *names,
                     "--quiet"]) == 0
    selected = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["selected_parameters"]
    assert sorted(selected) == sorted(names)
    assert cli.main(["diff", str(tuned_dir), str(base_dir), str(tmp_path / "b"), "--parameters-file",
                     str(tmp_path / "a" / "adapter_config.json"), "--quiet"]) == 0
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["selected_parameters"] == selected


def test_diff_refuses_bad_inputs(full_finetune, tmp_path, capsys):
    base_dir, tuned_dir, _ = full_finetune
    resized = tiny_model("llama", layers=2)
    resized.resize_token_embeddings(120)
    resized.save_pretrained(tmp_path / "resized")
    assert cli.main(["diff", str(tmp_path / "resized"), str(base_dir), str(tmp_path / "x"), "--quiet"]) == 1
    assert "differ in tensor shapes (a resized vocabulary?)" in capsys.readouterr().err
    assert cli.main(["diff", str(base_dir), str(base_dir), str(tmp_path / "x"), "--quiet"]) == 1
    assert "identical values for every selected tensor" in capsys.readouterr().err
    assert cli.main(["diff", str(tuned_dir), str(base_dir), str(tmp_path / "x"), "--parameters", "nope.weight",
                     "--quiet"]) == 1
    assert "does not have: nope.weight" in capsys.readouterr().err
    assert not any(p.name.startswith((".x", "x")) for p in tmp_path.iterdir())


def test_diff_of_a_tied_model_stores_the_shared_embedding_once(tmp_path):
    base = tiny_model("llama", layers=2, tie_word_embeddings=True)
    base.save_pretrained(tmp_path / "base")
    tuned = tiny_model("llama", layers=2, tie_word_embeddings=True)
    for param in tuned.parameters():
        param.requires_grad_(True)
    train_steps(tuned, steps=1)
    tuned.save_pretrained(tmp_path / "tuned")
    result = extract_adapter(tmp_path / "tuned", tmp_path / "base", tmp_path / "adapter", progress=False)
    assert "model.embed_tokens.weight" in result.selected and "lm_head.weight" not in result.selected
    loaded = PeftModel.from_pretrained(tiny_model("llama", layers=2, tie_word_embeddings=True), tmp_path / "adapter")
    assert (logits(loaded) - logits(tuned)).abs().max() <= 1e-5
    record = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_fingerprint"]
    assert record["tensors"]["model.embed_tokens.weight"]["xxh3_128"] == digest(base.model.embed_tokens.weight)
