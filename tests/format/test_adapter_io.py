"""The adapter on disk holds only ``tuned - base`` of the selection; loading, merging, disabling and several named
adapters behave as they do for LoRA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_models import batch, clone_state, tiny_model, train_steps

from peft_hft import HFTConfig
from peft_hft.format.keys import diff_key, parameter_name_of
from peft_hft.format.reader import AdapterFormatError
from peft_hft.tuner.layer import find_ledger


def logits(model, seed=0):
    with torch.no_grad():
        return model(**batch(seed)).logits


@pytest.fixture
def trained(tmp_path):
    """A tiny llama trained with HFT for a few steps, saved to tmp_path/'adapter'."""
    model = tiny_model("llama", layers=2)
    base = clone_state(model)
    peft_model = get_peft_model(model, HFTConfig(seed=0))
    train_steps(peft_model, steps=3)
    path = tmp_path / "adapter"
    peft_model.save_pretrained(path)
    return peft_model, base, path


def test_saved_file_holds_exactly_the_diffs(trained):
    peft_model, base, path = trained
    assert sorted(os.listdir(path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "HFT"
    selected = config["selected_parameters"]
    tensors = load_file(path / "adapter_model.safetensors")
    assert len(tensors) == len(selected)
    assert {parameter_name_of(k) for k in tensors} == set(selected)
    tuned = peft_model.get_base_model().state_dict()
    for name in selected:
        diff = tensors[diff_key(name)]
        assert diff.dtype == tuned[name].dtype
        assert torch.equal(diff, tuned[name] - base[name])
        assert diff.abs().max() > 0  # every selected tensor was trained
    expected_bytes = sum(base[n].numel() * base[n].element_size() for n in selected)
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == expected_bytes


def test_diff_keys_cannot_be_mistaken_for_weights():
    assert diff_key("model.layers.0.self_attn.q_proj.weight") == "base_model.model.model.layers.0.self_attn.q_proj.hft_diff.weight"
    assert diff_key("model.layers.0.mlp.experts.gate_up_proj") == "base_model.model.model.layers.0.mlp.experts.hft_diff.gate_up_proj"
    for name in ("lm_head.weight", "model.layers.3.mlp.experts.down_proj", "weight"):
        assert parameter_name_of(diff_key(name)) == name
    assert parameter_name_of("base_model.model.model.layers.0.self_attn.q_proj.weight") is None


def test_reload_reproduces_the_tuned_logits(trained):
    peft_model, base, path = trained
    expected = logits(peft_model)
    fresh = tiny_model("llama", layers=2)
    fresh.load_state_dict(base)
    loaded = PeftModel.from_pretrained(fresh, path)
    assert (logits(loaded) - expected).abs().max() <= 1e-5
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference by default
    trainable = PeftModel.from_pretrained(tiny_model("llama", layers=2), path, is_trainable=True)
    assert {n.removeprefix("base_model.model.") for n, p in trainable.named_parameters() if p.requires_grad} == set(
        trainable.peft_config["default"].selected_parameters
    )


def test_fresh_process_reloads_with_identical_logits(trained, tmp_path):
    peft_model, base, path = trained
    torch.save({"base": base, "logits": logits(peft_model)}, tmp_path / "expected.pt")
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {tests_dir!r})
        import peft_hft
        from peft import PeftModel
        from tiny_models import batch, tiny_model
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        model = tiny_model("llama", layers=2, seed=99)
        model.load_state_dict(expected["base"])
        model = PeftModel.from_pretrained(model, {str(path)!r})
        with torch.no_grad():
            got = model(**batch(0)).logits
        print("MAXDIFF", (got - expected["logits"]).abs().max().item())
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    max_diff = float(out.stdout.split("MAXDIFF")[1])
    assert max_diff <= 1e-5


def test_merge_and_unload_returns_the_plain_model_with_base_plus_diff(trained):
    peft_model, base, path = trained
    expected = logits(peft_model)
    diffs = load_file(path / "adapter_model.safetensors")
    fresh = tiny_model("llama", layers=2)
    fresh.load_state_dict(base)
    merged = PeftModel.from_pretrained(fresh, path).merge_and_unload()
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not hasattr(merged, "hft") and not hasattr(merged, "peft_config")
    state = merged.state_dict()
    for name, b in base.items():
        key = diff_key(name)
        want = b + diffs[key] if key in diffs else b
        torch.testing.assert_close(state[name], want, rtol=0, atol=1e-6)
    assert (logits(merged) - expected).abs().max() <= 1e-5


def test_disable_adapter_gives_exact_base_logits(trained):
    peft_model, base, _ = trained
    tuned = logits(peft_model)
    reference = tiny_model("llama", layers=2)
    reference.load_state_dict(base)
    with peft_model.disable_adapter():
        assert torch.equal(logits(peft_model), logits(reference))
    assert torch.equal(logits(peft_model), tuned)


def test_merge_unmerge_and_unload(trained):
    peft_model, base, _ = trained
    tuned = logits(peft_model)
    peft_model.merge_adapter()
    assert torch.equal(logits(peft_model), tuned)
    with pytest.warns(UserWarning, match="All adapters are already merged"):
        peft_model.merge_adapter()
    peft_model.unmerge_adapter()
    assert torch.equal(logits(peft_model), tuned)
    unloaded = peft_model.unload()
    assert all(torch.equal(v, base[k]) for k, v in unloaded.state_dict().items())
    assert not hasattr(unloaded, "hft")


def test_safe_merge_refuses_nans():
    model = tiny_model("llama", layers=2)
    peft_model = get_peft_model(model, HFTConfig())
    name = peft_model.peft_config["default"].selected_parameters[3]
    with torch.no_grad():
        model.get_parameter(name)[0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter default seems to be broken"):
        peft_model.merge_and_unload(safe_merge=True)


def test_several_named_adapters(trained, tmp_path):
    peft_model, base, path = trained
    tuned_a = logits(peft_model)
    # a second adapter with another selection, trained differently
    other = get_peft_model(tiny_model("llama", layers=2), HFTConfig(seed=5))
    train_steps(other, steps=3, seed=100)
    other.save_pretrained(tmp_path / "b")
    tuned_b = logits(other)

    fresh = tiny_model("llama", layers=2)
    model = PeftModel.from_pretrained(fresh, path, adapter_name="a")
    result = model.load_adapter(tmp_path / "b", adapter_name="b")
    assert result.missing_keys == []
    assert (logits(model) - tuned_a).abs().max() <= 1e-5  # loading does not activate
    model.set_adapter("b")
    assert (logits(model) - tuned_b).abs().max() <= 1e-5
    model.set_adapter("a")
    assert (logits(model) - tuned_a).abs().max() <= 1e-5
    with model.disable_adapter():
        assert torch.equal(logits(model), logits(tiny_model("llama", layers=2)))
    model.delete_adapter("a")
    assert model.active_adapters == ["b"] and "a" not in model.peft_config
    assert (logits(model) - tuned_b).abs().max() <= 1e-5
    merged = model.merge_and_unload()
    assert (logits(merged) - tuned_b).abs().max() <= 1e-5


def test_switching_adapters_keeps_training_progress():
    model = tiny_model("llama", layers=2)
    peft_model = get_peft_model(model, HFTConfig(seed=0))
    train_steps(peft_model, steps=2)
    tuned = clone_state(model)
    peft_model.add_adapter("other", HFTConfig(seed=1))
    peft_model.set_adapter("other")
    train_steps(peft_model, steps=2, seed=50)
    other_tuned = clone_state(model)
    peft_model.set_adapter("default")
    assert all(torch.equal(v, tuned[k]) for k, v in model.state_dict().items())
    peft_model.set_adapter("other")
    assert all(torch.equal(v, other_tuned[k]) for k, v in model.state_dict().items())


def test_merging_two_adapters_sums_their_diffs():
    base_model = tiny_model("llama", layers=2)
    base = clone_state(base_model)
    model = get_peft_model(base_model, HFTConfig(seed=0, init_weights=False))
    model.add_adapter("two", HFTConfig(seed=1, init_weights=False))
    ledger = find_ledger(model)
    d1, d2 = ledger.diffs("default"), ledger.diffs("two")
    merged = model.merge_and_unload(adapter_names=["default", "two"])
    state = merged.state_dict()
    for name, value in base.items():
        want = value.clone()
        for d in (d1, d2):
            if name in d:
                want = want + d[name]
        torch.testing.assert_close(state[name], want, rtol=0, atol=1e-6)


def test_adapter_for_another_model_is_refused_and_model_left_alone(trained):
    _, _, path = trained
    wrong = tiny_model("llama", layers=2, intermediate_size=48)
    before = clone_state(wrong)
    with pytest.raises(ValueError, match="does not match this model: shape mismatches: model.layers"):
        PeftModel.from_pretrained(wrong, path)
    assert not hasattr(wrong, "hft") and not hasattr(wrong, "peft_config")
    assert all(torch.equal(v, before[k]) for k, v in wrong.state_dict().items())
    assert all(p.requires_grad for p in wrong.parameters())


def test_adapter_whose_file_and_config_disagree_is_refused(trained, tmp_path):
    _, _, path = trained
    tensors = load_file(path / "adapter_model.safetensors")
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    broken = tmp_path / "broken"
    broken.mkdir()
    save_file(tensors, broken / "adapter_model.safetensors")
    (broken / "adapter_config.json").write_text((path / "adapter_config.json").read_text())
    with pytest.raises(ValueError, match=f"no diff for the selected tensors {parameter_name_of(dropped)}"):
        PeftModel.from_pretrained(tiny_model("llama", layers=2), broken)


def test_bf16_diffs_are_exact_with_float32_option(tmp_path):
    model = tiny_model("llama", layers=2, dtype=torch.bfloat16)
    base = clone_state(model)
    peft_model = get_peft_model(model, HFTConfig(seed=0, diff_dtype="float32"))
    train_steps(peft_model, steps=2, lr=5e-2)
    tuned = clone_state(model)
    peft_model.save_pretrained(tmp_path / "a")
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    fresh = tiny_model("llama", layers=2, dtype=torch.bfloat16)
    fresh.load_state_dict(base)
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "a")
    assert all(torch.equal(v, tuned[k]) for k, v in loaded.get_base_model().state_dict().items())


def test_transformers_load_adapter_and_auto_peft_model(trained, tmp_path):
    peft_model, base, path = trained
    expected = logits(peft_model)
    model = tiny_model("llama", layers=2)
    model.load_state_dict(base)
    model.load_adapter(str(path))
    assert (logits(model) - expected).abs().max() <= 1e-5
    assert model.active_adapters() == ["default"]
    model.disable_adapters()
    assert torch.equal(logits(model), logits(tiny_model("llama", layers=2)))
    model.enable_adapters()
    assert (logits(model) - expected).abs().max() <= 1e-5

    # AutoPeftModel resolves the base model from adapter_config.json
    base_dir = tmp_path / "base"
    reference = tiny_model("llama", layers=2)
    reference.save_pretrained(base_dir)
    config_path = path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(base_dir)
    config_path.write_text(json.dumps(config))
    auto = AutoPeftModelForCausalLM.from_pretrained(path)
    assert (logits(auto) - expected).abs().max() <= 1e-5


def test_transformers_add_adapter_and_save(tmp_path):
    model = tiny_model("llama", layers=2)
    model.add_adapter(HFTConfig(seed=0, init_weights=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = model.get_adapter_state_dict()
    assert {parameter_name_of(k) for k in state} == set(model.peft_config["default"].selected_parameters)


def test_config_roundtrip_records_the_selection(trained):
    peft_model, _, path = trained
    loaded = HFTConfig.from_pretrained(path)
    assert loaded.selected_parameters == peft_model.peft_config["default"].selected_parameters
    assert loaded.seed == 0 and loaded.ratio == 0.5 and loaded.strategy == "category"


def test_low_cpu_mem_usage_loading(trained):
    peft_model, base, path = trained
    expected = logits(peft_model)
    fresh = tiny_model("llama", layers=2)
    fresh.load_state_dict(base)
    loaded = PeftModel.from_pretrained(fresh, path, low_cpu_mem_usage=True)
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    assert (logits(loaded) - expected).abs().max() <= 1e-5
    loaded.load_adapter(path, adapter_name="other", low_cpu_mem_usage=True)
    loaded.set_adapter("other")
    assert (logits(loaded) - expected).abs().max() <= 1e-5


def test_an_adapter_that_diverged_to_nan_is_refused_at_save_not_after(tmp_path):
    """Issue 19: saving NaN weights used to succeed silently, and then the package's own loader refused the file."""
    import peft_hft

    peft_model = get_peft_model(tiny_model("llama", layers=2), HFTConfig())
    name = peft_model.peft_config["default"].selected_parameters[2]
    with torch.no_grad():
        peft_model.get_base_model().get_parameter(name)[0] = float("nan")
    with pytest.raises(ValueError, match=rf"NaN/Inf value\(s\) in {name}.*nothing was saved.*allow_non_finite"):
        peft_model.save_pretrained(tmp_path / "a")
    assert not (tmp_path / "a").exists()
    with peft_hft.allow_non_finite():  # the opt-out the message names works both ways
        peft_model.save_pretrained(tmp_path / "a")
        loaded = PeftModel.from_pretrained(tiny_model("llama", layers=2), tmp_path / "a")
    assert torch.isnan(loaded.get_base_model().get_parameter(name)[0]).all()


def test_unknown_fields_in_adapter_config_warn_like_lora(trained, tmp_path):
    _, _, path = trained
    config = json.loads((path / "adapter_config.json").read_text())
    case = tmp_path / "newer"
    case.mkdir()
    (case / "adapter_config.json").write_text(json.dumps({**config, "from_the_future": "x", "zeta": 1}))
    (case / "adapter_model.safetensors").write_bytes((path / "adapter_model.safetensors").read_bytes())
    with pytest.warns(UserWarning, match=r"Unexpected fields \['from_the_future', 'zeta'\].*newer peft-hft"):
        PeftModel.from_pretrained(tiny_model("llama", layers=2), case)


@pytest.mark.parametrize("reader", ["readinto", "mapped"])
def test_tensors_read_from_a_file_are_exact(tmp_path, reader):
    """Both ways of reading (``read_tensor``, which checks stream through, and ``MappedFile``, which full loads copy
    out of) put each tensor into fresh memory of its own (not a view of the file): the values are the file's, bit
    for bit, for a large fp32, a small bf16 and an odd-sized uint8 tensor, and survive the file being overwritten in
    place, also while it is still mapped."""
    from peft_hft.format.checkpoint import MappedFile, read_header, read_tensor

    g = torch.Generator().manual_seed(0)
    tensors = {"large": torch.randn(2048, 2048, generator=g), "small": torch.randn(16, 16, generator=g).bfloat16(),
               "odd": torch.randint(0, 255, (7,), generator=g, dtype=torch.uint8), "empty": torch.zeros(0, 3)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, path)
    entries, _ = read_header(path)
    with open(path, "rb") as handle, MappedFile(handle, entries.values()) as mapped:
        read = {key: mapped.read(e) if reader == "mapped" else read_tensor(e, handle) for key, e in entries.items()}
        for key, tensor in tensors.items():
            assert read[key].dtype == tensor.dtype and torch.equal(read[key], tensor)
        with open(path, "r+b") as f:
            f.write(b"\0" * path.stat().st_size)
        for key, tensor in tensors.items():
            assert torch.equal(read[key], tensor)
    for key, tensor in tensors.items():
        assert torch.equal(read[key], tensor)


def test_a_file_shortened_after_its_header_was_read_is_refused_before_it_is_mapped(tmp_path, monkeypatch):
    """The reader maps its open handle after checking its size against the header's entries: a file now shorter
    than the header claims (cut between the header check and the read) is an AdapterFormatError naming the sizes,
    not a SIGBUS later."""
    from peft_hft.format import reader

    model = get_peft_model(tiny_model("llama", layers=2), HFTConfig(init_weights=False, seed=0))
    model.save_pretrained(tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    real_mapped_file = reader.MappedFile

    def cut_then_map(handle, entries):
        size = weights.stat().st_size
        with open(weights, "r+b") as f:
            f.truncate(size - 4)
        return real_mapped_file(handle, entries)

    monkeypatch.setattr(reader, "MappedFile", cut_then_map)
    with pytest.raises(AdapterFormatError, match=r"is truncated: it holds \d+ bytes, its header needs \d+.*Fix"):
        PeftModel.from_pretrained(tiny_model("llama", layers=2), tmp_path / "a")
