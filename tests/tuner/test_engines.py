"""The ledger's contract with distributed engines, on one process: tensors that keep their value are never touched,
an engine's flat buffer stays the parameter's storage, a sharded model is never half-changed, saving takes only whole
values, and every process draws the same adapter."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file
from tiny_models import batch, clone_state, tiny_model, train_steps
from torch import nn

from peft_hft import HFTConfig
from peft_hft.format.keys import diff_key
from peft_hft.integrations.distributed import save_adapter, selection_digest, unwrap_peft_model, verify_ranks_agree
from peft_hft.tuner import engines
from peft_hft.tuner.layer import HFTLayer, find_ledger


def logits(model):
    with torch.no_grad():
        return model(**batch()).logits


def selected(peft_model) -> list[str]:
    return list(peft_model.peft_config["default"].selected_parameters)


def test_adding_an_adapter_leaves_the_weights_where_they_are():
    model = tiny_model("llama")
    pointers = {n: p.data_ptr() for n, p in model.named_parameters()}
    peft_model = get_peft_model(model, HFTConfig(seed=0))
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == pointers
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(selected(peft_model))


def _into_flat_buffer(model: nn.Module, names: list[str]) -> torch.Tensor:
    """Make the parameters ``names`` views into one flat buffer, as DeepSpeed ZeRO-1/2 does."""
    params = [model.get_parameter(n) for n in names]
    flat = torch.cat([p.data.reshape(-1) for p in params])
    offset = 0
    for p in params:
        p.data = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    return flat


def test_flat_buffer_views_go_back_to_their_buffer_when_originals_live_elsewhere(monkeypatch):
    # The originals of GPU weights live in host memory; "cpu:0" plays that other device here (it is not equal to
    # "cpu", so the ledger takes the copying path it takes on a GPU).
    monkeypatch.setattr(HFTLayer, "_store_device", lambda self, name, param: torch.device("cpu", 0))
    model = tiny_model("llama")
    base_logits = logits(model)
    peft_model = get_peft_model(model, HFTConfig(seed=0))
    train_steps(peft_model, steps=1)
    names = selected(peft_model)
    in_buffer, owned = names[::2], names[1::2]  # some tensors in the engine's buffer, some on their own
    flat = _into_flat_buffer(model, in_buffer)
    tuned, tuned_logits = clone_state(model), logits(peft_model)

    with peft_model.disable_adapter():
        assert torch.equal(logits(peft_model), base_logits)
    assert torch.equal(logits(peft_model), tuned_logits)
    assert all(torch.equal(v, tuned[k]) for k, v in model.state_dict().items())
    for name in in_buffer:  # still views into the buffer: the engine's next update reaches the model
        param = model.get_parameter(name)
        assert param.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    flat.add_(1.0)
    assert all(torch.equal(model.get_parameter(n), tuned[n] + 1.0) for n in in_buffer)
    assert all(torch.equal(model.get_parameter(n), tuned[n]) for n in owned)


def _pretend_zero3(model: nn.Module, names: list[str]) -> None:
    """Mark parameters the way DeepSpeed ZeRO-3 does (without partitioning them)."""
    for name in names:
        param = model.get_parameter(name)
        param.ds_id, param.ds_shape, param.ds_numel = 0, param.shape, param.numel()


def test_a_sharded_model_refuses_to_move_tensors_and_is_left_unchanged(tmp_path):
    model = tiny_model("llama")
    peft_model = get_peft_model(model, HFTConfig(seed=0))
    train_steps(peft_model, steps=1)
    _pretend_zero3(model, selected(peft_model))
    ledger = find_ledger(peft_model)
    tuned, trainable = clone_state(model), {n for n, p in model.named_parameters() if p.requires_grad}

    with pytest.raises(RuntimeError, match="sharded by DeepSpeed ZeRO-3.*ref_model"):
        with peft_model.disable_adapter():
            pass
    with pytest.raises(RuntimeError, match="sharded by DeepSpeed ZeRO-3"):
        peft_model.base_model.disable_adapter_layers()
    with pytest.raises(RuntimeError, match="sharded by DeepSpeed ZeRO-3"):
        peft_model.base_model.unload()  # would put the originals back
    assert find_ledger(model) is ledger
    peft_model.merge_adapter()  # the weights already hold the adapter: a flag changes, no tensor moves
    assert ledger.merged_adapters == ["default"]  # (unload() now would keep them, as LoRA's does: nothing moves)
    peft_model.unmerge_adapter()
    assert not ledger._disable_adapters and ledger.merged_adapters == [] and ledger._active_adapter == ["default"]
    assert ledger.hft_adapters["default"].requires_grad
    assert all(torch.equal(v, tuned[k]) for k, v in model.state_dict().items())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable


def test_a_sharded_model_saves_from_a_gathered_state_dict_and_refuses_to_gather_on_one_process(tmp_path):
    model = tiny_model("llama")
    base = clone_state(model)
    peft_model = get_peft_model(model, HFTConfig(seed=0))
    train_steps(peft_model, steps=1)
    gathered = {k: v.clone() for k, v in peft_model.state_dict().items()}  # what Trainer hands PEFT
    _pretend_zero3(model, selected(peft_model))

    with pytest.raises(RuntimeError, match="gathered from every process.*save_adapter"):
        peft_model.save_pretrained(tmp_path / "plain", state_dict={})  # e.g. ZeRO-3 without the 16-bit gather
    peft_model.save_pretrained(tmp_path / "gathered", state_dict=gathered)
    tensors = load_file(tmp_path / "gathered" / "adapter_model.safetensors")
    for name in selected(peft_model):
        assert torch.equal(tensors[diff_key(name)], model.get_parameter(name).detach() - base[name])


def test_shards_and_placeholders_in_a_state_dict_are_not_taken_for_values(tmp_path):
    model = tiny_model("llama")
    base = clone_state(model)
    peft_model = get_peft_model(model, HFTConfig(seed=0))
    train_steps(peft_model, steps=1)
    placeholders = {k: torch.empty(0) for k in peft_model.state_dict()}  # ZeRO-3's state_dict() before gathering
    peft_model.save_pretrained(tmp_path, state_dict=placeholders)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    for name in selected(peft_model):
        assert torch.equal(tensors[diff_key(name)], model.get_parameter(name).detach() - base[name])
        assert tensors[diff_key(name)].abs().max() > 0


def test_perturbed_adapters_are_drawn_from_the_seed_not_the_global_generator():
    drawn = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)  # every process's global generator is in a different state
        peft_model = get_peft_model(tiny_model("llama"), HFTConfig(seed=5, init_weights=False))
        drawn.append(clone_state(peft_model.get_base_model()))
    assert all(torch.equal(drawn[0][k], drawn[1][k]) for k in drawn[0])
    other = get_peft_model(tiny_model("llama"), HFTConfig(seed=6, init_weights=False))
    assert any(not torch.equal(v, drawn[0][k]) for k, v in other.get_base_model().state_dict().items())


def test_fingerprint_covers_selection_and_base_values():
    a = get_peft_model(tiny_model("llama"), HFTConfig(seed=0))
    same = get_peft_model(tiny_model("llama"), HFTConfig(seed=0))
    other_weights = get_peft_model(tiny_model("llama", seed=1), HFTConfig(seed=0))
    assert selection_digest(a) == selection_digest(same) == selection_digest(other_weights)
    assert selection_digest(a, check_values=True) == selection_digest(same, check_values=True)
    assert selection_digest(a, check_values=True) != selection_digest(other_weights, check_values=True)
    verify_ranks_agree(a, check_values=True)  # one process: nothing to compare, no error


class _Wrapper(nn.Module):
    """Stands in for DDP / DeepSpeedEngine, which keep the model in .module."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def test_save_adapter_unwraps_engines_and_matches_save_pretrained(tmp_path):
    peft_model = get_peft_model(tiny_model("llama"), HFTConfig(seed=0))
    train_steps(peft_model, steps=1)
    assert unwrap_peft_model(_Wrapper(_Wrapper(peft_model))) is peft_model
    with pytest.raises(TypeError, match="Expected a PeftModel"):
        unwrap_peft_model(_Wrapper(tiny_model("llama")))
    save_adapter(_Wrapper(peft_model), tmp_path / "helper")
    peft_model.save_pretrained(tmp_path / "plain")
    helper = load_file(tmp_path / "helper" / "adapter_model.safetensors")
    plain = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    assert helper.keys() == plain.keys() and all(torch.equal(helper[k], plain[k]) for k in plain)


def test_injecting_into_dtensors_is_refused_with_the_order_to_follow(monkeypatch):
    monkeypatch.setattr(engines, "is_dtensor", lambda tensor: isinstance(tensor, nn.Parameter))
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="before the model is sharded"):
        get_peft_model(model, HFTConfig(seed=0))
    assert find_ledger(model) is None


def test_perturbing_a_sharded_model_is_refused_before_anything_changes():
    model = tiny_model("llama")
    _pretend_zero3(model, [n for n, _ in model.named_parameters()])
    with pytest.raises(ValueError, match="init_weights=False cannot perturb"):
        get_peft_model(model, HFTConfig(seed=0, init_weights=False))
    assert find_ledger(model) is None and all(p.requires_grad for p in model.parameters())
