"""Masks of a continual run: a new draw per stage ("random"), the fewest tensors of the previous stage the structure
allows ("complementary", checked against brute force), or the same mask ("fixed")."""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from fractions import Fraction

import pytest
from tiny_models import tiny_model

from peft_hft import HFTConfig
from peft_hft.continual import ContinualHFT
from peft_hft.tuner.selection import BLOCK_CATEGORIES, analyze_model, resolve_selection


def block_groups(model, category):
    """Unit names of ``category``, one list per block."""
    groups = defaultdict(list)
    for unit in analyze_model(model).block_units():
        if unit.category == category:
            groups[unit.block].append(unit.name)
    return [groups[b] for b in sorted(groups)]


def brute_force_min_overlap(groups, ratio, avoid):
    """Fewest avoided units over every selection with the category structure: each block takes the floor or ceiling
    of its share, the total is an integer nearest to the exact share."""
    r = Fraction(ratio)
    exact = r * sum(len(g) for g in groups)
    nearest = min(abs(t - exact) for t in (math.floor(exact), math.ceil(exact)))
    totals = {t for t in (math.floor(exact), math.ceil(exact)) if abs(t - exact) == nearest}
    options = []
    for group in groups:
        sizes = {math.floor(r * len(group)), math.ceil(r * len(group))}
        options.append([c for k in sizes for c in itertools.combinations(group, k)])
    best = None
    for combo in itertools.product(*options):
        if sum(len(c) for c in combo) in totals:
            cost = sum(name in avoid for c in combo for name in c)
            best = cost if best is None else min(best, cost)
    return best


def overlap_in(groups, names, avoid):
    return sum(n in avoid and n in names for g in groups for n in g)


@pytest.mark.parametrize(
    ("previous_ratio", "ratio"), [(0.5, 0.5), (0.75, 0.5), (0.5, 0.75), (0.25, 0.75), (0.75, 0.25)]
)
@pytest.mark.parametrize("seed", [0, 1])
def test_complementary_overlap_is_the_minimum_the_structure_allows(previous_ratio, ratio, seed):
    model = tiny_model("llama", layers=4)
    previous = set(resolve_selection(model, HFTConfig(ratio=previous_ratio, seed=seed)))
    plain = set(resolve_selection(model, HFTConfig(ratio=ratio, seed=seed + 10)))
    chosen = set(resolve_selection(model, HFTConfig(ratio=ratio, seed=seed + 10), avoid=sorted(previous)))
    for category in ("attention", "feed_forward", "norm"):
        groups = block_groups(model, category)
        # the structure is kept: the same count per block as some plain draw could give, the same total
        r = Fraction(ratio)
        for group in groups:
            assert sum(n in chosen for n in group) in {math.floor(r * len(group)), math.ceil(r * len(group))}
        assert sum(n in chosen for g in groups for n in g) == sum(n in plain for g in groups for n in g) or (
            (r * sum(map(len, groups))).denominator == 2  # a .5 share may round either way
        )
        assert overlap_in(groups, chosen, previous) == brute_force_min_overlap(groups, ratio, previous)
    # outside the blocks the paper trains embeddings, lm_head and the final norm at every stage
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert name in chosen


def test_complementary_at_half_trains_none_of_the_previous_block_tensors():
    model = tiny_model("llama", layers=3)  # 3 blocks: the feed-forward half rounds differently per block
    previous = resolve_selection(model, HFTConfig(seed=0))
    chosen = set(resolve_selection(model, HFTConfig(seed=1), avoid=previous))
    block_names = {u.name for u in analyze_model(model).block_units()}
    assert not chosen & set(previous) & block_names
    assert len(chosen & block_names) == len(set(previous) & block_names)  # the exact complement, also half


@pytest.mark.parametrize("strategy", ["layer", "model"])
def test_complementary_for_the_ablation_strategies(strategy):
    model = tiny_model("llama", layers=4)
    previous = resolve_selection(model, HFTConfig(strategy=strategy, seed=0))
    chosen = resolve_selection(model, HFTConfig(strategy=strategy, seed=5), avoid=previous)
    block_names = {u.name for u in analyze_model(model).block_units()}
    assert not set(chosen) & set(previous) & block_names
    assert len(set(chosen) & block_names) == len(set(previous) & block_names)


def test_param_count_strategy_prefers_untrained_tensors_under_gqa():
    model = tiny_model("llama", layers=4)  # k_proj/v_proj are smaller than q_proj/o_proj: unequal weights
    config = HFTConfig(strategy="param_count", seed=0)
    previous = resolve_selection(model, config)
    chosen = resolve_selection(model, HFTConfig(strategy="param_count", seed=3), avoid=previous)
    block = {u.name: u.numel for u in analyze_model(model).block_units()}
    shared = sum(block[n] for n in set(chosen) & set(previous) if n in block)
    plain_shared = [
        sum(block[n] for n in set(resolve_selection(model, HFTConfig(strategy="param_count", seed=s))) & set(previous)
            if n in block)
        for s in range(1, 9)
    ]
    assert shared <= min(plain_shared)
    assert abs(sum(block[n] for n in chosen if n in block) - sum(block.values()) / 2) <= max(block.values())


def test_avoiding_nothing_is_the_plain_draw():
    model = tiny_model("llama", layers=3)
    for strategy in ("category", "param_count", "layer", "model"):
        config = HFTConfig(strategy=strategy, seed=7)
        assert resolve_selection(model, config, avoid=()) == resolve_selection(model, config)


def masks_of(policy, tmp_path, stages=3, **config):
    model = tiny_model("llama", layers=4)
    continual = ContinualHFT(model, HFTConfig(seed=2, **config), tmp_path / policy, policy=policy)
    for k in range(stages):
        with continual.stage(f"task{k}"):
            pass
    return continual.history, model


def test_random_policy_draws_a_new_half_per_stage(tmp_path):
    history, model = masks_of("random", tmp_path)
    masks = [set(s.selected_parameters) for s in history.stages]
    assert [s.seed for s in history.stages] == [2, 3, 4]
    assert masks[0] != masks[1] != masks[2] != masks[0]
    for stage in history.stages:  # every stage is an ordinary HFT draw with its seed
        assert stage.selected_parameters == resolve_selection(model, HFTConfig(seed=stage.seed))
    assert history.stages[0].overlap_tensors == 0
    for previous, stage in zip(history.stages, history.stages[1:], strict=False):
        assert stage.overlap_tensors == len(set(previous.selected_parameters) & set(stage.selected_parameters))


def test_complementary_policy_alternates_halves(tmp_path):
    history, model = masks_of("complementary", tmp_path)
    block_names = {u.name for u in analyze_model(model).block_units()}
    for previous, current in zip(history.stages, history.stages[1:], strict=False):
        assert not set(previous.selected_parameters) & set(current.selected_parameters) & block_names
        assert current.overlap_tensors == 3  # embeddings, lm_head and the final norm, trained at every stage
    counts = {c: 0 for c in BLOCK_CATEGORIES}
    for unit in analyze_model(model).block_units():
        counts[unit.category] += unit.name in history.stages[1].selected_parameters
    assert counts["attention"] == 8 and counts["feed_forward"] == 6 and counts["norm"] == 4  # still half


def test_fixed_policy_keeps_the_first_mask(tmp_path):
    history, _ = masks_of("fixed", tmp_path)
    assert history.stages[0].selected_parameters == history.stages[1].selected_parameters
    assert history.stages[1].selected_parameters == history.stages[2].selected_parameters
    assert history.stages[2].overlap_tensors == len(history.stages[2].selected_parameters)
