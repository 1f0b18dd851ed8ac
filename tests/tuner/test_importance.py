"""Importance-aware selection: scores, the calibration pass (bounded memory), and the configs it writes."""

from __future__ import annotations

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from test_selection import units_by_category
from tiny_models import VOCAB, tiny_model

import peft_hft
from peft_hft import HFTConfig, calibrate, importance_scores
from peft_hft.tuner.importance import STRATEGIES, spectral_snr
from peft_hft.tuner.selection import ATTENTION, FEED_FORWARD, NORM, analyze_model

DATA_STRATEGIES = [s for s, (needs_data, _, _) in STRATEGIES.items() if needs_data]


def loader(batches: int = 3, size: int = 2, length: int = 12, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Token batches with padding at the end of the second row (masked out of every statistic)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        ids = torch.randint(3, VOCAB, (size, length), generator=g)
        mask = torch.ones_like(ids)
        mask[-1, length // 2:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def chosen_in(names, block: int, category: str, model) -> set[str]:
    layout = analyze_model(model)
    return {u.short for u in layout.block_units() if u.block == block and u.category == category and u.name in names}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_each_strategy_is_deterministic_and_keeps_the_category_shares(strategy):
    model = tiny_model("llama", layers=4)
    data = None if strategy == "snr" else loader()
    first = calibrate(model, data, strategy=strategy, ratio=0.5, seed=1, progress=False)
    again = calibrate(model, data, strategy=strategy, ratio=0.5, seed=1, progress=False)
    assert first.selected_parameters == again.selected_parameters
    _, totals, per_block = units_by_category(model, first.selected_parameters)
    assert totals[ATTENTION] == [8, 16] and totals[FEED_FORWARD] == [6, 12] and totals[NORM] == [4, 8]
    for block in range(4):
        assert per_block[(ATTENTION, block)] == 2 and per_block[(NORM, block)] == 1
    assert sorted(per_block[(FEED_FORWARD, b)] for b in range(4)) == [1, 1, 2, 2]
    assert {"model.embed_tokens.weight", "model.norm.weight"} <= set(first.selected_parameters)
    assert first.calibration["strategy"] == strategy and first.calibration["structure"] == "category"
    assert first.strategy == "category" and first.ratio == 0.5


def test_other_ratio_and_model_structure_keep_their_shares():
    model = tiny_model("llama", layers=4)
    config = calibrate(model, loader(), strategy="wanda", ratio=0.25, progress=False)
    _, totals, _ = units_by_category(model, config.selected_parameters)
    assert totals[ATTENTION] == [4, 16] and totals[NORM] == [2, 8] and totals[FEED_FORWARD] == [3, 12]
    wide = calibrate(model, loader(), strategy="wanda", config=HFTConfig(strategy="model"), progress=False)
    layout = analyze_model(model)
    block = [u for u in layout.block_units() if u.name in wide.selected_parameters]
    assert len(block) == len(layout.block_units()) // 2
    scores = importance_scores(model, loader(), "wanda", progress=False).scores
    kept = sorted(scores[u.name] for u in block)
    left = sorted(scores[u.name] for u in layout.block_units() if u.name not in wide.selected_parameters)
    assert kept[-1] <= left[0]  # model-wide: exactly the least important half trains


def _low_rank(shape, rank: int, scale: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    signal = torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g)
    return scale * signal + 0.01 * torch.randn(shape, generator=g)


def test_snr_trains_the_matrices_with_structure():
    model = tiny_model("llama", layers=2)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for name in ("k_proj", "o_proj"):
                proj = getattr(layer.self_attn, name)
                proj.weight.copy_(_low_rank(proj.weight.shape, 2, 1.0, seed=i))
            for name in ("q_proj", "v_proj"):
                proj = getattr(layer.self_attn, name)
                proj.weight.normal_(0, 0.02)
    noise = spectral_snr(torch.randn(64, 64))
    assert spectral_snr(_low_rank((64, 64), 2, 1.0, 0)) > 10 * noise
    assert spectral_snr(torch.ones(5)) is None
    config = calibrate(model, strategy="snr", progress=False)
    for block in range(2):
        assert chosen_in(config.selected_parameters, block, ATTENTION, model) == {"self_attn.k_proj", "self_attn.o_proj"}


def test_wanda_trains_what_old_knowledge_needs_least():
    """Scaled weights: q, k and down are the most important; gate, up the least; post_attention_layernorm's output is
    100x larger than input_layernorm's."""
    model = tiny_model("llama", layers=2)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(100)
            layer.self_attn.k_proj.weight.mul_(100)
            layer.mlp.up_proj.weight.mul_(10)
            layer.mlp.down_proj.weight.mul_(100)
            layer.post_attention_layernorm.weight.mul_(100)
    config = calibrate(model, loader(), strategy="wanda", progress=False)
    names = config.selected_parameters
    for block in range(2):
        assert chosen_in(names, block, ATTENTION, model) == {"self_attn.v_proj", "self_attn.o_proj"}
        assert chosen_in(names, block, NORM, model) == {"input_layernorm"}
        assert chosen_in(names, block, FEED_FORWARD, model) in ({"mlp.gate_proj"}, {"mlp.gate_proj", "mlp.up_proj"})


def test_wanda_scores_match_a_direct_computation_and_ignore_padding():
    model = tiny_model("llama", layers=2)
    data = loader(batches=2)
    scores = importance_scores(model, data, "wanda", progress=False).scores
    proj = model.model.layers[1].mlp.down_proj
    inputs = []
    handle = proj.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach()))
    with torch.no_grad():
        for batch in data:
            model(**batch)
    handle.remove()
    rows = torch.cat([x[b.bool()] for x, b in zip(inputs, [d["attention_mask"] for d in data], strict=True)])
    expected = (proj.weight.detach().abs() * rows.norm(dim=0)).mean()
    assert scores["model.layers.1.mlp.down_proj.weight"] == pytest.approx(float(expected), rel=1e-5)
    # changing what sits under the padding changes nothing
    padded = [{**d, "input_ids": torch.where(d["attention_mask"].bool(), d["input_ids"], 5)} for d in data]
    again = importance_scores(model, padded, "wanda", progress=False).scores
    assert again["model.layers.1.mlp.down_proj.weight"] == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("strategy", ["fisher", "gradient"])
def test_gradient_scores_match_full_backward_and_pick_by_direction(strategy):
    model = tiny_model("llama", layers=2)
    with torch.no_grad():  # block 0's attention output is zero: q, k and v get no gradient, o_proj does
        model.model.layers[0].self_attn.o_proj.weight.zero_()
    data = loader(batches=2)
    scores = importance_scores(model, data, strategy, progress=False).scores
    reference = tiny_model("llama", layers=2)
    reference.load_state_dict(model.state_dict())
    up = reference.model.layers[1].mlp.up_proj.weight
    squares = 0.0
    for batch in data:  # the empirical Fisher: squared gradients per batch, averaged over batches and elements
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        reference(**batch, labels=labels).loss.backward()
        squares += float(up.grad.pow(2).mean())
        reference.zero_grad(set_to_none=True)
    assert scores["model.layers.1.mlp.up_proj.weight"] == pytest.approx(squares / len(data), rel=1e-4)
    assert scores["model.layers.0.self_attn.v_proj.weight"] == 0.0
    assert scores["model.layers.0.self_attn.o_proj.weight"] > 0
    names = calibrate(model, data, strategy=strategy, progress=False).selected_parameters
    trains_o = "self_attn.o_proj" in chosen_in(names, 0, ATTENTION, model)
    assert trains_o == (strategy == "gradient")  # the task needs o_proj most; old knowledge needs it most too


def test_calibration_memory_is_bounded_and_the_model_left_unchanged():
    model = tiny_model("llama", layers=2)
    model.model.embed_tokens.weight.requires_grad_(False)
    model.lm_head.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = importance_scores(model, loader(batches=1, length=8), "wanda", progress=False)
    large = importance_scores(model, loader(batches=6, length=24), "wanda", progress=False)
    layout = analyze_model(model)
    expected = 0
    for unit in layout.block_units():
        module = model.get_submodule(unit.name.rpartition(".")[0])
        expected += module.in_features if isinstance(module, torch.nn.Linear) else module.weight.numel()
    # one float per input feature of every matrix (per output feature of every norm), whatever the amount of data
    assert small.statistics_numel == large.statistics_numel == expected
    assert large.tokens == 6 * (2 * 24 - 12) and large.batches == 6
    fisher = importance_scores(model, loader(), "fisher", progress=False)
    assert fisher.peak_live_gradients == 1  # each gradient is read and freed before the next one is accumulated
    assert all(p.grad is None for p in model.parameters())
    assert model.model.embed_tokens.weight.requires_grad is False and model.lm_head.weight.requires_grad is False
    assert model.model.layers[0].self_attn.q_proj.weight.requires_grad is True
    assert not model.training
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("strategy", ["snr", "wanda", "gradient"])
def test_bf16_models_score_like_fp32(strategy):
    fp32 = tiny_model("llama", layers=2)
    bf16 = tiny_model("llama", layers=2, dtype=torch.bfloat16)
    data = None if strategy == "snr" else loader()
    a = importance_scores(fp32, data, strategy, progress=False).scores
    b = importance_scores(bf16, data, strategy, progress=False).scores
    assert a.keys() == b.keys() and all(isinstance(v, float) for v in b.values())
    for name in a:
        assert b[name] == pytest.approx(a[name], rel=0.15, abs=1e-9), name
    config = calibrate(bf16, data, strategy=strategy, progress=False)
    _, totals, _ = units_by_category(bf16, config.selected_parameters)
    assert totals[ATTENTION] == [4, 8] and totals[NORM] == [2, 4]
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())


def test_config_round_trip_through_save_and_load(tmp_path):
    base = tiny_model("llama", layers=2)
    config = calibrate(base, loader(), strategy="wanda", ratio=0.5, seed=3, max_batches=2, progress=False)
    assert config.calibration["batches"] == 2 and config.calibration["trains"] == "least important"
    model = get_peft_model(base, config)
    trained = sorted(n.removeprefix("base_model.model.") for n, p in model.named_parameters() if p.requires_grad)
    assert trained == sorted(config.selected_parameters)
    model.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, HFTConfig)
    assert loaded.calibration == config.calibration and loaded.selected_parameters == config.selected_parameters
    again = PeftModel.from_pretrained(tiny_model("llama", layers=2), tmp_path, is_trainable=True)
    assert sorted(n.removeprefix("base_model.model.") for n, p in again.named_parameters() if p.requires_grad) \
        == trained


def test_bad_input_is_refused_with_a_fix():
    model = tiny_model("llama", layers=2)
    with pytest.raises(ValueError, match="Unknown importance strategy"):
        calibrate(model, loader(), strategy="magnitude")
    with pytest.raises(ValueError, match="needs calibration data"):
        calibrate(model, strategy="wanda")
    with pytest.raises(ValueError, match="no batch"):
        calibrate(model, [], strategy="wanda", progress=False)
    with pytest.raises(ValueError, match="'layer'"):
        calibrate(model, strategy="snr", config=HFTConfig(strategy="layer"), progress=False)
    with pytest.raises(ValueError, match="selected_parameters"):
        HFTConfig(calibration={"strategy": "wanda"})
    with pytest.raises(TypeError, match="base model"):
        calibrate(get_peft_model(tiny_model("llama"), HFTConfig()), loader(), strategy="wanda")
    assert peft_hft.calibrate is calibrate


@pytest.mark.parametrize("max_batches", [0, -1, 1.5, True])
def test_a_bad_max_batches_is_named_not_the_dataloader(max_batches):
    with pytest.raises(ValueError, match=r"max_batches must be a positive int.*got") as info:
        calibrate(tiny_model("llama"), loader(), strategy="wanda", max_batches=max_batches)
    assert "dataloader yielded no batch" not in str(info.value)


def test_a_calibration_that_saw_no_token_warns():
    batches = [{**b, "attention_mask": torch.zeros_like(b["attention_mask"])} for b in loader(batches=2)]
    with pytest.warns(UserWarning, match="saw 0 tokens in 2 batch"):
        config = calibrate(tiny_model("llama"), batches, strategy="wanda")
    assert config.calibration["tokens"] == 0
