"""Which tensors HFT trains: the paper's category-level selection and its ablations, on many architectures."""

from __future__ import annotations

import random
from collections import Counter, defaultdict

import pytest
import torch
from peft import get_peft_model
from tiny_models import TINY_SPECS, tiny_model
from torch import nn

from peft_hft import HFTConfig
from peft_hft.tuner.selection import (
    ATTENTION,
    EMBEDDING,
    FEED_FORWARD,
    FINAL_NORM,
    LM_HEAD,
    NORM,
    ROUTER,
    analyze_model,
    resolve_selection,
)

ARCHS = list(TINY_SPECS)


def units_by_category(model, names):
    """category -> (trained units, all units) over the blocks; plus per-block counts."""
    layout = analyze_model(model)
    chosen = set(names)
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    per_block: dict[tuple[str, int], int] = Counter()
    for unit in layout.block_units():
        totals[unit.category][1] += 1
        if unit.name in chosen:
            totals[unit.category][0] += 1
            per_block[(unit.category, unit.block)] += 1
    return layout, dict(totals), per_block


def test_tiny_llama_matches_the_paper():
    model = tiny_model("llama", layers=2)
    names = resolve_selection(model, HFTConfig(seed=0))
    layout, totals, per_block = units_by_category(model, names)
    assert totals[ATTENTION] == [4, 8]  # exactly half of q, k, v, o
    assert totals[FEED_FORWARD] == [3, 6]  # exactly half of gate, up, down
    assert totals[NORM] == [2, 4]
    for block in range(2):
        assert per_block[(ATTENTION, block)] == 2
        assert per_block[(NORM, block)] == 1  # one of the two norms in every block
    assert sorted(per_block[(FEED_FORWARD, b)] for b in range(2)) == [1, 2]  # floor in one block, ceil in the other
    for required in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert required in names


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_gets_half_of_every_category(arch):
    model = tiny_model(arch, layers=4)
    names = resolve_selection(model, HFTConfig(seed=3))
    layout, totals, _ = units_by_category(model, names)
    assert layout.num_blocks == 4
    assert {ATTENTION, FEED_FORWARD, NORM} <= set(totals), totals
    for category, (trained, total) in totals.items():
        assert abs(trained - 0.5 * total) <= 0.5 + 1e-9, (category, trained, total)
    params = dict(model.named_parameters())
    assert set(names) <= set(params)
    # embeddings and the output layer train (tied ones are one tensor)
    emb = model.get_input_embeddings().weight
    assert any(params[n] is emb for n in names)
    out = model.get_output_embeddings()
    if out is not None:
        assert any(params[n] is out.weight for n in names)


@pytest.mark.parametrize("arch", ["qwen2", "gpt2", "gpt_neox", "opt"])
def test_bias_follows_its_weight(arch):
    model = tiny_model(arch, layers=2)
    names = set(resolve_selection(model, HFTConfig(seed=1)))
    params = dict(model.named_parameters())
    biased = [n for n in params if n.endswith(".bias")]
    assert biased
    for bias in biased:
        weight = bias[: -len("bias")] + "weight"
        if weight in params:
            assert (bias in names) == (weight in names), bias


def test_moe_experts_and_router_are_categorised():
    model = tiny_model("mixtral", layers=2)
    layout = analyze_model(model)
    by_name = {u.name: u for u in layout.units}
    assert by_name["model.layers.0.mlp.experts.gate_up_proj"].category == FEED_FORWARD
    assert by_name["model.layers.0.mlp.experts.down_proj"].category == FEED_FORWARD
    assert model.get_parameter("model.layers.0.mlp.experts.gate_up_proj").dim() == 3
    assert by_name["model.layers.0.mlp.gate.weight"].category == ROUTER
    qwen = analyze_model(tiny_model("qwen2_moe", layers=2))
    cats = {u.short: u.category for u in qwen.units if u.block == 0}
    assert cats["mlp.shared_expert_gate"] == ROUTER
    assert cats["mlp.shared_expert.up_proj"] == FEED_FORWARD


def test_fused_projections_are_single_units():
    phi3 = analyze_model(tiny_model("phi3", layers=2))
    block0 = {u.short: u.category for u in phi3.units if u.block == 0}
    assert block0["self_attn.qkv_proj"] == ATTENTION and block0["mlp.gate_up_proj"] == FEED_FORWARD
    gpt2 = analyze_model(tiny_model("gpt2", layers=2))
    unit = next(u for u in gpt2.units if u.short == "attn.c_attn" and u.block == 0)
    assert unit.params == ("transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias")
    outside = {u.short: u.category for u in gpt2.outside_units()}
    assert outside == {"transformer.wte": EMBEDDING, "transformer.wpe": EMBEDDING, "transformer.ln_f": FINAL_NORM}
    llama = analyze_model(tiny_model("llama", layers=2))
    assert {u.short: u.category for u in llama.outside_units()}["lm_head"] == LM_HEAD


def test_floor_and_ceil_alternate_at_random_and_total_is_exact():
    model = tiny_model("llama", layers=6)
    patterns = set()
    for seed in range(8):
        names = resolve_selection(model, HFTConfig(seed=seed))
        _, totals, per_block = units_by_category(model, names)
        assert totals[FEED_FORWARD] == [9, 18]
        counts = [per_block[(FEED_FORWARD, b)] for b in range(6)]
        assert sorted(counts) == [1, 1, 1, 2, 2, 2]
        patterns.add(tuple(counts))
    assert len(patterns) > 2  # which blocks round up is drawn at random


def test_selection_depends_on_seed_only():
    model = tiny_model("llama", layers=6)
    config = HFTConfig(seed=11)
    torch.manual_seed(123)
    random.seed(5)
    first = resolve_selection(model, config)
    torch.manual_seed(999)
    random.seed(77)
    _ = torch.rand(10), random.random()
    assert resolve_selection(model, config) == first
    # a model built with other random weights but the same structure gets the same selection
    assert resolve_selection(tiny_model("llama", layers=6, seed=42), HFTConfig(seed=11)) == first
    assert resolve_selection(model, HFTConfig(seed=12)) != first


@pytest.mark.parametrize("ratio", [0.25, 0.75, 1.0])
def test_other_ratios(ratio):
    model = tiny_model("llama", layers=4)
    names = resolve_selection(model, HFTConfig(ratio=ratio))
    _, totals, _ = units_by_category(model, names)
    for category, (trained, total) in totals.items():
        assert abs(trained - ratio * total) <= 0.5 + 1e-9, (category, trained, total)


def test_layer_strategy_trains_whole_blocks():
    model = tiny_model("llama", layers=6)
    names = resolve_selection(model, HFTConfig(strategy="layer", seed=2))
    layout = analyze_model(model)
    chosen = set(names)
    trained_blocks = {u.block for u in layout.block_units() if u.name in chosen}
    assert len(trained_blocks) == 3
    for unit in layout.block_units():
        assert (unit.name in chosen) == (unit.block in trained_blocks)


def test_model_strategy_draws_half_of_all_block_tensors():
    model = tiny_model("llama", layers=4)
    names = resolve_selection(model, HFTConfig(strategy="model", seed=4))
    layout = analyze_model(model)
    block_units = layout.block_units()
    chosen = [u for u in block_units if u.name in set(names)]
    assert len(chosen) == len(block_units) // 2
    per_block = Counter(u.block for u in chosen)
    assert len(set(per_block.values())) > 1 or len(per_block) < 4  # not balanced by construction


def test_param_count_strategy_balances_parameters_under_gqa():
    model = tiny_model("llama", layers=4)  # k/v projections are half the size of q/o
    names = set(resolve_selection(model, HFTConfig(strategy="param_count", seed=0)))
    layout = analyze_model(model)
    for category in (ATTENTION, FEED_FORWARD, NORM):
        units = [u for u in layout.block_units() if u.category == category]
        trained = sum(u.numel for u in units if u.name in names)
        assert trained == sum(u.numel for u in units) // 2, category
    # under "category", two of four attention matrices are drawn, whatever their sizes
    counts = set()
    for seed in range(6):
        chosen = set(resolve_selection(model, HFTConfig(seed=seed)))
        counts.add(sum(u.numel for u in layout.block_units() if u.category == ATTENTION and u.name in chosen))
    assert len(counts) > 1


def test_train_embeddings_false_freezes_embeddings_and_final_norm():
    model = tiny_model("llama")
    names = resolve_selection(model, HFTConfig(train_embeddings=False))
    assert not {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} & set(names)


def test_target_and_exclude_modules_restrict_the_pool():
    model = tiny_model("llama", layers=4)
    names = resolve_selection(model, HFTConfig(target_modules=["q_proj", "v_proj"], seed=0))
    block = [n for n in names if ".layers." in n]
    assert block and all(".q_proj." in n or ".v_proj." in n for n in block)
    assert len(block) == 4  # half of the 8 candidates
    names = resolve_selection(model, HFTConfig(exclude_modules=["lm_head", "o_proj"], seed=0))
    assert "lm_head.weight" not in names and not any("o_proj" in n for n in names)
    regex = resolve_selection(model, HFTConfig(target_modules=r".*\.mlp\..*", train_embeddings=False))
    assert all(".mlp." in n for n in regex)


def test_modules_to_save_and_trainable_tokens_train_the_embeddings():
    model = tiny_model("llama")
    names = resolve_selection(model, HFTConfig(train_embeddings=False, modules_to_save=["lm_head"]))
    assert "lm_head.weight" in names and "model.embed_tokens.weight" not in names
    names = resolve_selection(model, HFTConfig(train_embeddings=False, trainable_token_indices=[5, 6]))
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(names)


def test_custom_selection_is_used_as_given_and_tied_names_are_canonical():
    model = tiny_model("gemma")  # tied embeddings
    config = HFTConfig(selected_parameters=["lm_head.weight", "model.layers.1.mlp.up_proj.weight"])
    peft_model = get_peft_model(model, config)
    assert config.selected_parameters == ["model.embed_tokens.weight", "model.layers.1.mlp.up_proj.weight"]
    trainable = sorted(n for n, p in peft_model.named_parameters() if p.requires_grad)
    assert trainable == ["base_model.model.model.embed_tokens.weight", "base_model.model.model.layers.1.mlp.up_proj.weight"]


class _NoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        return self.out(self.inp(x))


def test_model_without_blocks_is_refused_with_a_fix_and_left_alone():
    model = _NoBlocks()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="No repeated transformer blocks.*layers_pattern.*strategy='model'"):
        get_peft_model(model, HFTConfig())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert not hasattr(model, "hft") and not hasattr(model, "peft_config")
    # the model-level strategy works on any model
    peft_model = get_peft_model(model, HFTConfig(strategy="model"))
    assert sum(p.requires_grad for p in peft_model.parameters()) == 2  # one of two (weight, bias) units


def test_unknown_selected_parameters_are_refused_and_model_left_alone():
    model = tiny_model("llama")
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="does not have: model.layers.9.mlp.up_proj.weight"):
        get_peft_model(model, HFTConfig(selected_parameters=["model.layers.9.mlp.up_proj.weight"]))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert not hasattr(model, "hft")


def test_layers_pattern_names_the_block_list():
    model = tiny_model("llama", layers=2)
    assert len(resolve_selection(model, HFTConfig(layers_pattern="layers"))) > 0
    with pytest.raises(ValueError, match="No ModuleList named 'blocks'"):
        resolve_selection(model, HFTConfig(layers_pattern="blocks"))


@pytest.mark.parametrize("patterns", [["q_prj", "v_prj"], "model\\.layers\\.\\d+\\.attn\\.nothing", []])
def test_target_modules_that_match_nothing_are_refused_like_lora(patterns):
    """Issue 19, row 4: a typo, a regex that matches nothing or [] used to train only the embeddings, lm_head and the
    final norm; PEFT refuses such a LoRA config with NoMatchingPeftModuleError, and so does HFT."""
    from peft import NoMatchingPeftModuleError, get_peft_model

    model = tiny_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(NoMatchingPeftModuleError, match=r"not found in the base model.*q_proj.*v_proj") as info:
        get_peft_model(model, HFTConfig(target_modules=patterns))
    assert repr(patterns) in str(info.value)
    assert not hasattr(model, "hft") and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(NoMatchingPeftModuleError):  # LoRA's own behaviour, which HFT matches
        from peft import LoraConfig

        get_peft_model(tiny_model("llama"), LoraConfig(target_modules=["q_prj", "v_prj"]))
