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
    with pytest.raises(ValueError, match="HFTConfig.strategy must be one of 'category', 'layer', 'model', 'param_count'.*got 'random'"):
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


# Values of the wrong type for every HFTConfig field (issue 19, row 5): each must be refused with a ValueError at
# creation that names the field. A new field needs a line here (the guard below fails otherwise) and in
# peft_hft.tuner.config.FIELD_RULES.
WRONG_TYPES = {
    "ratio": ["0.5", None, True, [0.5]],
    "strategy": [5, None, ["category"]],
    "seed": ["a", 1.5, None, True],
    "train_embeddings": ["no", 0, 1, None, "False"],
    "target_modules": [5, ["q_proj", 5], {"q_proj": 1}],
    "exclude_modules": [5, [None], {"q_proj": 1}],
    "layers_pattern": [["layers"], 5],
    "selected_parameters": ["model.layers.0.mlp.up_proj.weight", [1, 2]],
    "calibration": ["snr", [1]],
    "originals_device": ["gpu", None, 0],
    "diff_dtype": ["int8", 16, True],
    "diff_encoding": [8, ["int8"], True],
    "master_weights": ["fp16", True, 4],
    "fp32_master_weights": ["yes", 1],
    "init_weights": ["no", 0, None],
    "modules_to_save": ["lm_head", [1]],
    "trainable_token_indices": ["x", [1, "2"], {"embed_tokens": "x"}, 5],
    "base_fingerprint": ["sha", [1]],
    "scaling": [0.5, ["alpha"]],
}


def test_every_field_has_a_type_rule_and_wrong_values_here():
    import dataclasses

    from peft.config import PeftConfig

    from peft_hft.tuner.config import FIELD_RULES

    own = {f.name for f in dataclasses.fields(HFTConfig)} - {f.name for f in dataclasses.fields(PeftConfig)}
    assert own == set(FIELD_RULES) == set(WRONG_TYPES)


@pytest.mark.parametrize("field, value", [(f, v) for f, values in WRONG_TYPES.items() for v in values])
def test_wrong_type_is_a_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"HFTConfig\.{field} must be"):
        HFTConfig(**{field: value})


@pytest.mark.parametrize(
    "kwargs",
    [dict(train_embeddings=False), dict(target_modules="q_proj|v_proj"), dict(target_modules=("q_proj",)),
     dict(trainable_token_indices=[3, 4]), dict(trainable_token_indices={"embed_tokens": [3]}),
     dict(layers_pattern="layers"), dict(diff_dtype="bfloat16"), dict(ratio=1)],
)
def test_right_types_are_accepted(kwargs):
    config = HFTConfig(**kwargs)
    for name, value in kwargs.items():
        assert getattr(config, name) == (list(value) if isinstance(value, tuple) else value)
