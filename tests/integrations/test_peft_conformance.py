"""PEFT's own generic checks (``PeftCommonTester`` and ``tests/test_custom_models.py`` from the installed peft
version's sdist) run against HFT.

Every check PEFT offers is either run here or listed in ``SKIPPED`` / ``CUSTOM_SKIPPED`` with the reason;
docs/conformance.md carries the same lists. The ``..._is_accounted_for`` tests fail when a new peft version adds a
check, and a check that skips itself fails here, so nothing is skipped silently.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import itertools

import pytest
import torch
from packaging.version import Version
from peft_upstream import generic_checks, load_custom_models, load_testing_common, upstream_checks, upstream_parameters
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM

from peft_hft import HFTConfig

# Checks that peft 0.22 added to its generic suite: listed below like the others, run or skipped where the installed
# peft offers them (the lowest supported peft, 0.21, does not).
PEFT = Version(importlib.metadata.version("peft"))
SINCE_PEFT_0_22 = {
    "get_additive_delta_corresponds_to_merged_weight", "load_no_warning", "merge_layers_dtype_device_conversion",
    "merge_layers_load_state_dict", "safe_merge_broken_adapter_leaves_base_layer_unchanged",
    "safe_merge_non_finite_bias_leaves_base_layer_unchanged", "save_pretrained_failure",
    "test_conv2d_padding", "test_forward_input_with_more_dims", "test_get_additive_delta_corresponds_to_merged_weight",
    "test_load_adapter_no_warning", "test_merge_layers_dtype_device_conversion", "test_merge_layers_load_state_dict",
    "test_merge_layers_modules_to_save_selection", "test_safe_merge_broken_adapter_leaves_base_layer_unchanged",
    "test_safe_merge_non_finite_bias_leaves_base_layer_unchanged", "test_save_pretrained_failure",
    "test_targeting_unknown_layer_type_raises",
}


def offered_here(check: str) -> bool:
    """Whether the installed peft version's suite has ``check``."""
    return check not in SINCE_PEFT_0_22 or PEFT >= Version("0.22")



# init_weights=False perturbs the selected tensors, the HFT counterpart of LoRA's init_lora_weights=False that PEFT
# uses so that an adapter changes the outputs.
PERTURBED = {"init_weights": False}

# check name -> (positional arguments after the config kwargs, config kwargs); a check with further parameters runs
# once per value PEFT gives them (_common_parameters)
RUN: dict[str, tuple[tuple, dict]] = {
    "load_no_warning": ((), PERTURBED),
    "merge_layers_dtype_device_conversion": ((), PERTURBED),
    "merge_layers_load_state_dict": ((), PERTURBED),
    "save_pretrained_failure": ((), PERTURBED),
    "model_attr": ((), PERTURBED),
    "prepare_for_training": ((), {"train_embeddings": False}),  # the check assumes frozen input embeddings
    "save_pretrained": ((), PERTURBED),
    "save_pretrained_selected_adapters": ((), PERTURBED),
    "save_pretrained_adapter_name_substring": ((), PERTURBED),
    "from_pretrained_config_construction": ((), PERTURBED),
    "load_multiple_adapters": ((), PERTURBED),
    "merge_layers_fp16": ((), PERTURBED),
    "merge_layers": ((), PERTURBED),
    "merge_layers_is_idempotent": ((), PERTURBED),
    "safe_merge": ((), PERTURBED),
    "mixed_adapter_batches": ((), PERTURBED),  # PEFT skips it for non-LoRA methods
    "generate_with_mixed_adapter_batches_and_beam_search": ((), PERTURBED),  # LoRA only, skipped by PEFT
    "generate": ((), PERTURBED),
    "generate_pos_args": ((False,), PERTURBED),
    "generate_half_prec": ((), PERTURBED),
    "inference_safetensors": ((), PERTURBED),
    "peft_model_device_map": ((), PERTURBED),
    "training_prompt_learning_tasks": ((), PERTURBED),  # prompt learning only, skipped by PEFT
    "delete_adapter": ((), PERTURBED),
    "delete_inactive_adapter": ((), PERTURBED),
    "delete_unknown_adapter_raises": ((), PERTURBED),
    "unload_adapter": ((), PERTURBED),
    "weighted_combination_of_adapters": ((), PERTURBED),  # LoRA/IA3 only, skipped by PEFT
    "disable_adapter": ((), PERTURBED),
    "adding_multiple_adapters_with_bias_raises": ((), PERTURBED),  # HFT has no `bias` option: PEFT skips it
    "passing_input_embeds_works": ((), PERTURBED),
    "lora_conversion": ((), PERTURBED),  # returns early: HFT does not claim LoRA conversion
    # HFT trains the base tensors in place; get_base_model_state_dict returns the base values the ledger keeps.
    "get_base_model_state_dict": ((), PERTURBED),
}


# HFT adds no parameters: it trains the selected base tensors in place. These checks find "the adapter" by looking
# for parameters whose names contain the method prefix (`hft_`) or the adapter name, which an HFT model never has.
_NO_ADAPTER_PARAMETERS = "identifies adapter weights by parameters named with the 'hft_' prefix or the adapter name; "
# What peft 0.22's new checks skip themselves for, on HFT:
_ADDITIVE_DELTA = ("PEFT skips it for methods without LoRA conversion (supports_lora_conversion() is False for HFT); "
                   "an HFT diff is the additive delta by construction (covered by "
                   "test_to_lora.py::test_full_rank_lora_reproduces_the_hft_model).")
_NO_WRAPPED_LAYER = ("looks for tuner layers that wrap a base layer with a weight; HFT's only tuner layer is the "
                     "ledger, which wraps none, so PEFT skips it; ")
SKIPPED: dict[str, str] = {
    "adapter_name": _NO_ADAPTER_PARAMETERS + "HFT adds no parameters (covered by test_adapter_io.py::test_several_named_adapters).",
    "training": _NO_ADAPTER_PARAMETERS
    + "it asserts every other parameter gets no gradient (covered by test_training.py::test_one_step_changes_exactly_the_selected_tensors).",
    "training_layer_indexing": "uses LoRA's `layers_to_transform` and prefix-named parameters; HFT restricts the pool "
    "with target_modules/exclude_modules instead (covered by test_selection.py::test_target_and_exclude_modules_restrict_the_pool).",
    "training_gradient_checkpointing": _NO_ADAPTER_PARAMETERS
    + "(covered by test_training.py::test_gradient_checkpointing_gives_the_same_gradients).",
    "merge_layers_nan": _NO_ADAPTER_PARAMETERS
    + "it writes NaNs into prefix-named parameters (covered by test_adapter_io.py::test_safe_merge_refuses_nans).",
    "merge_layers_multi": "counts adapter containers (ModuleDict/ParameterDict) holding 'default'; HFT keeps adapters "
    "in its ledger (covered by test_adapter_io.py::test_merging_two_adapters_sums_their_diffs and "
    "test_several_named_adapters).",
    "add_adapter_no_autocast_adapter_dtype": _NO_ADAPTER_PARAMETERS
    + "HFT never changes dtypes (covered by test_training.py::test_half_precision_models_train_in_their_own_dtype).",
    "weighted_combination_of_adapters_lora": "helper of weighted_combination_of_adapters for LoRA, not a check itself.",
    "weighted_combination_of_adapters_ia3": "helper of weighted_combination_of_adapters for IA3, not a check itself.",
    "load_model_low_cpu_mem_usage": "expects new adapter parameters on the meta device after injection with "
    "low_cpu_mem_usage=True; HFT creates none (loading with low_cpu_mem_usage=True is covered by "
    "test_adapter_io.py::test_low_cpu_mem_usage_loading).",
    "get_additive_delta_corresponds_to_merged_weight": _ADDITIVE_DELTA,
    "safe_merge_broken_adapter_leaves_base_layer_unchanged": _NO_WRAPPED_LAYER + "it poisons that layer's own "
    "parameters (covered by test_adapter_io.py::test_safe_merge_refuses_nans).",
    "safe_merge_non_finite_bias_leaves_base_layer_unchanged": _NO_WRAPPED_LAYER + "it poisons that layer's bias "
    "(covered by test_adapter_io.py::test_safe_merge_refuses_nans).",
}


@pytest.fixture(scope="module")
def common():
    return load_testing_common()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", layers=2).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tester(common):
    class HFTTester(common.PeftCommonTester):
        transformers_class = AutoModelForCausalLM
        torch_device = "cpu"

        def prepare_inputs_for_testing(self):
            input_ids = torch.tensor([[5, 7, 11, 13, 17, 19], [23, 29, 31, 37, 41, 43]])
            return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    return HFTTester()


def test_every_upstream_check_is_accounted_for(common):
    offered = set(upstream_checks(common))
    listed = {c for c in set(RUN) | set(SKIPPED) if offered_here(c)}
    assert offered == listed, (sorted(offered - listed), sorted(listed - offered))
    assert not set(RUN) & set(SKIPPED)


def _variants(parameters: dict[str, list]) -> list[dict]:
    """Every combination of the values of ``parameters`` (one empty dict when there are none)."""
    names = list(parameters)
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*parameters.values())]


def _fixtures(method, request) -> dict:
    wanted = inspect.signature(method).parameters
    out = {name: request.getfixturevalue(name) for name in ("recwarn", "tmp_path") if name in wanted}
    return {**out, "request": request} if "request" in wanted else out


def _common_parameters(check: str) -> dict[str, list]:
    """The further arguments of a common check, with the values PEFT runs the custom-model check of the same name
    with (``PeftCommonTester`` checks are not parametrized themselves); fixtures are passed by ``_fixtures``."""
    twin = getattr(load_custom_models().TestPeftCustomModel, f"test_{check}", None)
    return {} if twin is None else upstream_parameters(twin)[1]


COMMON_CASES = [(check, variant) for check in sorted(RUN) if offered_here(check)
                for variant in _variants(_common_parameters(check))]


@pytest.mark.parametrize(("check", "variant"), COMMON_CASES,
                         ids=[c + "".join(f"-{v}" for v in variant.values()) for c, variant in COMMON_CASES])
def test_upstream_check(check, variant, tester, model_dir, request):
    extra, config_kwargs = RUN[check]
    method = getattr(tester, f"_test_{check}")
    if check == "passing_input_embeds_works":
        method(check, model_dir, HFTConfig, dict(config_kwargs))
    else:
        method(model_dir, HFTConfig, dict(config_kwargs), *extra, **variant, **_fixtures(method, request))


# ------------------------------------------------------------------------------------------------------------------
# tests/test_custom_models.py: PEFT's checks on its small custom models, with HFT rows
# ------------------------------------------------------------------------------------------------------------------

# Rows in the shape of its TEST_CASES (test name, model id, config kwargs) for its MLP, its embedding + transformers
# Conv1D model, nn.Conv1d, nn.Conv2d and nn.MultiheadAttention models. They have no transformer blocks, so the tensors
# are named (as LoRA rows name target_modules), or drawn from all tensors with strategy="model". Like LoRA's rows they
# start as the identity; the checks that need a changed model set init_weights=False themselves.
CUSTOM_ROWS = [
    ("Vanilla MLP 1 HFT", "MLP", {"selected_parameters": ["lin0.weight"]}),
    ("Vanilla MLP 2 HFT", "MLP", {"strategy": "model", "ratio": 0.5, "seed": 1}),
    ("Embedding + Conv1D HFT", "EmbConv1D", {"selected_parameters": ["emb.weight", "conv1d.weight"]}),
    ("Conv1d HFT", "Conv1d", {"selected_parameters": ["conv1d.weight", "conv1d.bias"]}),
    ("Conv2d HFT", "Conv2d", {"selected_parameters": ["conv2d.weight", "lin0.weight"]}),
    ("MHA HFT", "MHA", {"selected_parameters": ["mha.in_proj_weight", "mha.out_proj.weight"]}),
]
# Rows in the shape of its MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES (on its MLP): two adapters on the same / other tensors.
MULTI_ROWS = [
    ("HFT Same", "hft", {"selected_parameters": ["lin0.weight"], "init_weights": False},
     {"selected_parameters": ["lin0.weight"], "init_weights": False, "seed": 1}),
    ("HFT Different", "hft", {"selected_parameters": ["lin0.weight"], "init_weights": False},
     {"selected_parameters": ["lin1.weight"], "init_weights": False}),
]
CUSTOM_RUN = [
    "test_conv2d_padding",
    "test_forward_input_with_more_dims",
    "test_load_adapter_no_warning",
    "test_merge_layers_dtype_device_conversion",
    "test_merge_layers_load_state_dict",
    "test_save_pretrained_failure",
    "test_active_adapter",
    "test_attributes_parametrized",
    "test_delete_adapter",
    "test_delete_adapter_properly_cleans_up_after_itself",
    "test_delete_inactive_adapter",
    "test_delete_merged_adapter_only_rejects_the_merged_one",
    "test_delete_merged_adapter_raises_without_mutation",
    "test_delete_unknown_adapter_raises",
    "test_disable_adapter_is_reentrant",
    "test_disable_adapters",
    "test_disable_adapters_exiting_context_irregular_state",
    "test_disable_adapters_exiting_context_restores_previous_state",
    "test_disable_adapters_with_merging",
    "test_forward_bfloat16",
    "test_forward_bfloat16_no_autocast",
    "test_forward_float16",
    "test_forward_float16_no_autocast",
    "test_forward_output_finite",
    "test_from_pretrained_config_construction",
    "test_get_base_model_state_dict",
    "test_inference_safetensors",
    "test_load_multiple_adapters",
    "test_merge_layers",
    "test_merge_layers_fp16",
    "test_merge_layers_is_deterministic_in_train_mode",
    "test_merge_layers_is_idempotent",
    "test_parameters_after_loading_model",
    "test_peft_model_device_map",
    "test_safe_merge",
    "test_save_load_roundtrip",
    "test_save_load_roundtrip_direct_injection",
    "test_save_pretrained",
    "test_save_pretrained_adapter_name_substring",
]
MULTI_RUN = [
    "test_merge_layers_multi",
    "test_multiple_active_adapters_forward",
    "test_multiple_active_adapters_merge_and_unmerge",
    "test_sequential_merge_matches_batch_merge",
    "test_unmerge_after_sequential_merge_restores_base",
]
_PREFIX_NAMED = "identifies the adapter by parameters named with the 'hft_' prefix or the adapter name, which HFT never has"
CUSTOM_SKIPPED: dict[str, str] = {
    "test_adapter_name": _PREFIX_NAMED + " (covered by test_adapter_io.py::test_several_named_adapters).",
    "test_training_custom_models": _PREFIX_NAMED + ", and asserts that no other parameter gets a gradient (covered by "
    "test_training.py::test_one_step_changes_exactly_the_selected_tensors).",
    "test_only_params_are_updated": _PREFIX_NAMED + ", and asserts that every other parameter, the trained tensors "
    "included, stays unchanged (covered by test_training.py::test_one_step_changes_exactly_the_selected_tensors).",
    "test_load_model_low_cpu_mem_usage": "expects new adapter parameters on the meta device after injection with "
    "low_cpu_mem_usage=True; HFT creates none (covered by test_adapter_io.py::test_low_cpu_mem_usage_loading).",
    "test_in_features_out_features_exposed": "asserts that every tuner layer exposes in_features/out_features; HFT's "
    "only tuner layer is the ledger, which wraps no layer.",
    "test_save_pretrained_pickle": "saves with safe_serialization=False and expects adapter_model.bin; HFT adapters "
    "are always saved as safetensors and pickles are never loaded (docs/security.md; covered by "
    "test_atomic_saves.py::test_pickle_is_never_written).",
    "test_adapter_dtype_autocast": "expects adapter weights upcast to float32; HFT trains the model's own tensors in "
    "their own dtype (covered by test_training.py::test_half_precision_models_train_in_their_own_dtype).",
    "test_disable_adapter_with_bias_warns": "LoRA/BOFT `bias` option only; PEFT skips it for every other method.",
    "test_adding_multiple_adapters_with_bias_raises": "LoRA `bias` option only; PEFT skips it for every other method.",
    "test_get_additive_delta_corresponds_to_merged_weight": _ADDITIVE_DELTA,
    "test_safe_merge_broken_adapter_leaves_base_layer_unchanged": _NO_WRAPPED_LAYER + "it poisons that layer's own "
    "parameters (covered by test_adapter_io.py::test_safe_merge_refuses_nans).",
    "test_safe_merge_non_finite_bias_leaves_base_layer_unchanged": _NO_WRAPPED_LAYER + "it poisons that layer's bias "
    "(covered by test_adapter_io.py::test_safe_merge_refuses_nans).",
    "test_merge_layers_modules_to_save_selection": "runs merge_layers_multi on the rows with modules_to_save, which "
    "counts adapter containers (ModuleDict/ParameterDict) holding 'default' (see merge_layers_multi above); HFT "
    "trains modules_to_save in place as diffs (covered by test_adapter_io.py::test_merging_two_adapters_sums_their_diffs).",
    "test_targeting_unknown_layer_type_raises": "expects get_peft_model to refuse target_modules of a module type the "
    "method has no layer for; HFT trains the tensors of any module in place, so no type is unknown, and PEFT skips it "
    "for rows without target_modules, as HFT's rows are.",
}
# Checks that PEFT runs on every row but that skip themselves outside some models: run on those models' rows only.
CUSTOM_ROW_MODELS: dict[str, set[str]] = {"test_forward_input_with_more_dims": {"MLP"}}


@pytest.fixture(scope="module")
def custom(common):
    return load_custom_models()


def test_every_custom_model_check_is_accounted_for(custom):
    offered = set(generic_checks(custom.TestPeftCustomModel, "config_kwargs"))
    listed = {c for c in set(CUSTOM_RUN) | set(CUSTOM_SKIPPED) if offered_here(c)}
    assert offered == listed, (sorted(offered - listed), sorted(listed - offered))
    assert not set(CUSTOM_RUN) & set(CUSTOM_SKIPPED)
    assert set(generic_checks(custom.TestMultipleActiveAdapters, "config_kwargs_1")) == set(MULTI_RUN)


def _run_upstream(method, *args, **kwargs) -> None:
    """Run an upstream check; one that skips itself fails here (it must be listed in CUSTOM_SKIPPED instead)."""
    try:
        method(*args, **kwargs)
    except pytest.skip.Exception as exc:
        pytest.fail(f"{method.__name__} skipped itself ({exc}); list it in CUSTOM_SKIPPED with the reason instead.")


def _custom_cases() -> list[tuple[str, tuple, dict]]:
    """(check, HFT row, further arguments) for every check of CUSTOM_RUN the installed peft offers: on the rows of
    the models PEFT runs it on, once per combination of the values PEFT parametrizes its further arguments with."""
    custom = load_custom_models()
    cases = []
    for check in CUSTOM_RUN:
        if not offered_here(check):
            continue
        models, parameters = upstream_parameters(getattr(custom.TestPeftCustomModel, check))
        models = CUSTOM_ROW_MODELS.get(check, models)
        for row in CUSTOM_ROWS:
            if row[1] in models:
                cases.extend((check, row, variant) for variant in _variants(parameters))
    return cases


CUSTOM_CASES = _custom_cases()


def test_every_custom_check_runs_on_some_row():
    assert {check for check, _, _ in CUSTOM_CASES} == {c for c in CUSTOM_RUN if offered_here(c)}


@pytest.mark.parametrize(("check", "row", "variant"), CUSTOM_CASES, ids=[
    f"{check}-{row[0]}" + "".join(f"-{v}" for v in variant.values()) for check, row, variant in CUSTOM_CASES])
def test_custom_model_check(check, row, variant, custom, request):
    tester = custom.TestPeftCustomModel()
    tester.torch_device = "cpu"
    method = getattr(tester, check)
    name, model_id, config_kwargs = row
    _run_upstream(method, name, model_id, HFTConfig, dict(config_kwargs), **variant, **_fixtures(method, request))


@pytest.mark.parametrize("row", MULTI_ROWS, ids=[row[0] for row in MULTI_ROWS])
@pytest.mark.parametrize("check", MULTI_RUN)
def test_multiple_active_adapters_check(check, row, custom):
    tester = custom.TestMultipleActiveAdapters()
    tester.torch_device = "cpu"
    name, method_name, kwargs_1, kwargs_2 = row
    _run_upstream(getattr(tester, check), name, method_name, HFTConfig, dict(kwargs_1), dict(kwargs_2))
