"""Bad configuration values are refused up front with a message that names the fix."""

from __future__ import annotations

import pytest

from peft_hft import HFTConfig


@pytest.mark.parametrize("ratio", [0, 0.0, -0.1, 1.01, 2, float("nan"), True, "0.5", None])
def test_ratio_outside_unit_interval_is_refused(ratio):
    with pytest.raises(ValueError, match=r"ratio must be (a number )?in \(0, 1\]"):
        HFTConfig(ratio=ratio)


def test_ratio_one_is_allowed():
    assert HFTConfig(ratio=1.0).ratio == 1.0


def test_unknown_strategy_names_the_choices():
    with pytest.raises(ValueError, match="Unknown HFTConfig.strategy 'random'.*'category', 'layer', 'model', 'param_count'"):
        HFTConfig(strategy="random")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(originals_device="gpu"), "originals_device must be 'cpu' or 'device'"),
        (dict(diff_dtype="int8"), "diff_dtype must be None"),
        (dict(seed="a"), "seed must be an int"),
        (dict(selected_parameters=[]), "selected_parameters is empty"),
        (dict(selected_parameters="model.layers.0.mlp.up_proj.weight"), "must be a list of parameter names"),
    ],
)
def test_other_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HFTConfig(**kwargs)


def test_sets_are_stored_as_sorted_lists_for_json():
    config = HFTConfig(target_modules={"v_proj", "q_proj"})
    assert config.target_modules == ["q_proj", "v_proj"]
