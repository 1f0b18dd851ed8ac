"""add_weighted_adapter on HFT models: PEFT's signature, checked against hand computations of every combination."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import tiny_model

from peft_hft import HFTConfig

WEIGHTS = [0.5, -1.5]


def two_adapters(dtype: torch.dtype = torch.float32):
    """A tiny llama with adapters 'default' (seed 0) and 'b' (seed 1): different but overlapping selections, with
    perturbed values (init_weights=False), plus the base weights and each adapter's diffs read off the weights."""
    model = tiny_model("llama", dtype=dtype)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = get_peft_model(model, HFTConfig(seed=0, init_weights=False))
    peft_model.add_adapter("b", HFTConfig(seed=1, init_weights=False))
    diffs = {}
    for adapter in ("default", "b"):
        peft_model.set_adapter(adapter)
        diffs[adapter] = {n: p.detach().float() - base[n.removeprefix("base_model.model.")].float()
                          for n, p in peft_model.named_parameters()}
        diffs[adapter] = {n.removeprefix("base_model.model."): d for n, d in diffs[adapter].items()}
    peft_model.set_adapter("default")
    return peft_model, base, diffs


def weights_of(peft_model, adapter: str) -> dict[str, torch.Tensor]:
    peft_model.set_adapter(adapter)
    return {n.removeprefix("base_model.model."): p.detach().clone() for n, p in peft_model.named_parameters()}


def selections(peft_model, *adapters):
    return [set(peft_model.peft_config[a].selected_parameters) for a in adapters]


def hand_prune(d: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density * numel) largest magnitudes of d (the TIES paper's trim step)."""
    k = int(density * d.numel())
    mask = torch.zeros(d.numel(), dtype=torch.bool)
    mask[d.abs().flatten().topk(k).indices] = True
    return d * mask.view(d.shape)


def hand_ties(ds: list[torch.Tensor], ws: list[float], density: float) -> torch.Tensor:
    """Trim, elect the sign of the summed trimmed diffs, average the weighted entries that agree with it."""
    trimmed = torch.stack([hand_prune(d, density) for d in ds])
    sign = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0)
    agree = trimmed.sign() == sign
    weighted = trimmed * torch.tensor(ws).view(-1, *[1] * ds[0].dim())
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("combination_type", ["linear", "cat"])
def test_linear_is_exact_task_arithmetic(dtype, combination_type):
    peft_model, base, diffs = two_adapters(dtype)
    a, b = selections(peft_model, "default", "b")
    assert a != b and a & b, "the test needs different but overlapping selections"
    peft_model.add_weighted_adapter(["default", "b"], WEIGHTS, "mix", combination_type=combination_type)
    assert peft_model.active_adapters == ["default"]  # added, not activated (as LoRA)
    assert list(peft_model.peft_config["mix"].selected_parameters) == [n for n in base if n in a | b]
    got = weights_of(peft_model, "mix")
    for name, value in base.items():
        expected = (value.float() + WEIGHTS[0] * diffs["default"][name] + WEIGHTS[1] * diffs["b"][name]).to(dtype)
        if name not in a | b:
            assert torch.equal(got[name], value), name
        elif dtype == torch.float32:
            torch.testing.assert_close(got[name], expected, rtol=0, atol=1e-6)
        else:  # one bf16 rounding of the same float32 sum; at most one ulp apart where the sums differ in the last bit
            torch.testing.assert_close(got[name].float(), expected.float(), rtol=2 ** -7, atol=1e-6)
    # a tensor only one adapter selects is that adapter's diff, weighted (the other counts as zero)
    only_b = next(n for n in base if n in b - a)
    torch.testing.assert_close(got[only_b].float(), (base[only_b].float() + WEIGHTS[1] * diffs["b"][only_b]).to(dtype)
                               .float(), rtol=0, atol=1e-6)
    assert not torch.equal(got[only_b], base[only_b])


def test_ties_and_magnitude_prune_match_hand_computation():
    peft_model, base, diffs = two_adapters()
    a, b = selections(peft_model, "default", "b")
    peft_model.add_weighted_adapter(["default", "b"], WEIGHTS, "ties", combination_type="ties", density=0.5)
    peft_model.add_weighted_adapter(["default", "b"], WEIGHTS, "mp", combination_type="magnitude_prune", density=0.3)
    ties, pruned = weights_of(peft_model, "ties"), weights_of(peft_model, "mp")
    for name in (n for n in base if n in a | b):
        ds = [diffs["default"][name], diffs["b"][name]]
        torch.testing.assert_close(ties[name] - base[name], hand_ties(ds, WEIGHTS, 0.5), rtol=0, atol=1e-6)
        expected = WEIGHTS[0] * hand_prune(ds[0], 0.3) + WEIGHTS[1] * hand_prune(ds[1], 0.3)
        torch.testing.assert_close(pruned[name] - base[name], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("combination_type", ["dare_linear", "dare_ties"])
def test_dare_keeps_rescaled_entries_and_follows_torch_seed(combination_type):
    peft_model, base, diffs = two_adapters()
    a, b = selections(peft_model, "default", "b")
    for name, seed in (("x", 0), ("y", 0), ("z", 1)):
        torch.manual_seed(seed)
        peft_model.add_weighted_adapter(["default", "b"], WEIGHTS, name, combination_type=combination_type, density=0.5)
    x, y, z = (weights_of(peft_model, n) for n in "xyz")
    only_a = [n for n in base if n in a - b]
    for name in only_a:  # one adapter: each entry is dropped or rescaled by 1 / density
        delta, d = x[name] - base[name], WEIGHTS[0] * diffs["default"][name]
        kept = delta != 0
        assert 0.3 < kept.float().mean() < 0.7
        torch.testing.assert_close(delta[kept], d[kept] / 0.5, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(x[n], y[n]) for n in base)  # same torch seed, same drop mask
    assert any(not torch.equal(x[n], z[n]) for n in only_a)


def test_single_adapter_is_scaled_and_the_mix_saves_as_a_normal_adapter(tmp_path):
    peft_model, base, diffs = two_adapters()
    peft_model.add_weighted_adapter(["b"], [2.0], "twice", combination_type="ties")  # one adapter: linear (as LoRA)
    twice = weights_of(peft_model, "twice")
    for name in peft_model.peft_config["b"].selected_parameters:
        torch.testing.assert_close(twice[name], base[name] + 2.0 * diffs["b"][name], rtol=0, atol=1e-6)
    peft_model.save_pretrained(tmp_path, selected_adapters=["twice"])
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "twice")
    for name, param in loaded.named_parameters():
        assert torch.equal(param, twice[name.removeprefix("base_model.model.")]), name


def test_combination_errors_name_the_problem():
    peft_model, _, _ = two_adapters()
    with pytest.raises(ValueError, match="low-rank.*linear"):
        peft_model.add_weighted_adapter(["default", "b"], WEIGHTS, "m", combination_type="svd")
    with pytest.raises(ValueError, match="low-rank"):
        peft_model.add_weighted_adapter(["default", "b"], WEIGHTS, "m", combination_type="dare_ties_svd", density=0.5)
    with pytest.raises(ValueError, match="Invalid combination_type"):
        peft_model.add_weighted_adapter(["default", "b"], WEIGHTS, "m", combination_type="average")
    with pytest.raises(ValueError, match="does not exist"):
        peft_model.add_weighted_adapter(["default", "nope"], WEIGHTS, "m")
    with pytest.raises(ValueError, match="2 adapters but 1 weights"):
        peft_model.add_weighted_adapter(["default", "b"], [1.0], "m")
    with pytest.raises(ValueError, match="needs density"):
        peft_model.add_weighted_adapter(["default", "b"], WEIGHTS, "m", combination_type="ties")
    with pytest.raises(ValueError, match="twice"):
        peft_model.add_weighted_adapter(["b", "b"], WEIGHTS, "m")
    assert set(peft_model.peft_config) == {"default", "b"}  # nothing half-added
    before = weights_of(peft_model, "b")
    with pytest.warns(UserWarning, match="already exists"):
        peft_model.add_weighted_adapter(["default"], [3.0], "b")
    assert all(torch.equal(before[n], v) for n, v in weights_of(peft_model, "b").items())
