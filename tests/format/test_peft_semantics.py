"""Where HFT could behave differently from LoRA it does what LoRA does: disabled means base outputs (merged or
not), ``merge_and_unload(adapter_names=...)`` merges exactly those, ``get_base_model_state_dict`` gives base values.

Each test runs HFT and LoRA side by side on the same tiny Llama, so the expected behaviour is PEFT's own."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_base_model_state_dict, get_peft_model
from tiny_models import batch, tiny_model, train_steps

from peft_hft import HFTConfig

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch(0)).logits


def config(method: str, **kwargs):
    if method == "lora":
        return LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False, **kwargs)
    return HFTConfig(init_weights=False, **kwargs)


@DTYPES
@pytest.mark.parametrize("method", ["lora", "hft"])
def test_disabled_means_base_outputs_after_merge_adapter(method, dtype):
    base_model = tiny_model("llama", dtype=dtype)
    base = logits(base_model)
    model = get_peft_model(base_model, config(method))
    tuned = logits(model)
    assert not torch.equal(tuned, base)
    model.merge_adapter()
    with model.disable_adapter():
        assert torch.allclose(logits(model), base, atol=1e-2 if dtype == torch.bfloat16 else 1e-5)
        if method == "hft":
            assert torch.equal(logits(model), base)  # HFT swaps tensors: exact
    # LoRA stays unmerged after a forward pass while disabled; HFT matches that state
    layer = next(m for m in model.modules() if hasattr(m, "merged_adapters"))
    assert layer.merged_adapters == []
    assert torch.allclose(logits(model), tuned, atol=1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("method", ["lora", "hft"])
def test_merge_and_unload_merges_exactly_the_named_adapters(method):
    def build():
        model = get_peft_model(tiny_model("llama"), config(method))
        model.add_adapter("other", config(method, **({"seed": 1} if method == "hft" else {"r": 4})))
        return model

    model = build()
    with torch.no_grad():
        default = logits(model)
        model.set_adapter("other")
        other = logits(model)
        model.set_adapter("default")
    assert not torch.allclose(default, other)
    only_other = build().merge_and_unload(adapter_names=["other"])  # "default" is active, but not named
    assert torch.allclose(logits(only_other), other, atol=1e-5)
    only_default = build().merge_and_unload(adapter_names=["default"])
    assert torch.allclose(logits(only_default), default, atol=1e-5)
    both = build().merge_and_unload(adapter_names=["default", "other"])
    assert not torch.allclose(logits(both), default, atol=1e-4)
    assert not torch.allclose(logits(both), other, atol=1e-4)


@DTYPES
def test_get_base_model_state_dict_returns_the_base_values_of_a_trained_model(dtype):
    model = tiny_model("llama", dtype=dtype)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = get_peft_model(model, HFTConfig(seed=0))
    train_steps(peft_model, steps=2, lr=5e-2)
    trained = peft_model.get_base_model().state_dict()
    changed = [k for k in base if not torch.equal(trained[k], base[k])]
    assert changed  # the model did train in place
    extracted = get_base_model_state_dict(peft_model)
    assert extracted.keys() == base.keys()
    for key, value in base.items():
        assert torch.equal(extracted[key], value), key
    assert torch.equal(logits(peft_model), logits(peft_model))  # the model itself is unchanged by the call
    assert not torch.equal(peft_model.get_base_model().state_dict()[changed[0]], base[changed[0]])


@DTYPES
@pytest.mark.parametrize("method", ["lora", "hft"])
def test_unload_after_merge_adapter_keeps_the_merged_weights(method, dtype):
    """Issue 19: LoRA's unload() after merge_adapter() returns the merged model; HFT returned the base."""
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    base_model = tiny_model("llama", dtype=dtype)
    base = logits(base_model)
    model = get_peft_model(base_model, config(method))
    tuned = logits(model)
    model.merge_adapter()
    unloaded = model.unload()
    assert torch.allclose(logits(unloaded), tuned, atol=tol) and not torch.allclose(logits(unloaded), base, atol=tol)
    assert not hasattr(unloaded, "hft") and not hasattr(unloaded, "peft_config")
    if method == "hft":
        assert torch.equal(logits(unloaded), tuned)
    fresh = get_peft_model(tiny_model("llama", dtype=dtype), config(method))  # without merge_adapter: the base
    assert torch.allclose(logits(fresh.unload()), base, atol=tol)
