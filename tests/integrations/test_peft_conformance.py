"""PEFT's own generic checks (``PeftCommonTester`` and ``tests/test_custom_models.py`` from the installed peft
version's sdist) run against HFT.

Every check PEFT offers is either run here or listed in ``SKIPPED`` / ``CUSTOM_SKIPPED`` with the reason;
docs/conformance.md carries the same lists. The ``..._is_accounted_for`` tests fail when a new peft version adds a
check, and a check that skips itself fails here, so nothing is skipped silently.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from peft_upstream import generic_checks, load_custom_models, load_testing_common, upstream_checks
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM

from peft_hft import HFTConfig

# init_weights=False perturbs the selected tensors, the HFT counterpart of LoRA's init_lora_weights=False that PEFT
# uses so that an adapter changes the outputs.
PERTURBED = {"init_weights": False}

# check name -> (positional arguments after the config kwargs, config kwargs)
RUN: dict[str, tuple[tuple, dict]] = {
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
    assert offered == set(RUN) | set(SKIPPED), (sorted(offered - set(RUN) - set(SKIPPED)), sorted((set(RUN) | set(SKIPPED)) - offered))
    assert not set(RUN) & set(SKIPPED)


@pytest.mark.parametrize("check", sorted(RUN))
def test_upstream_check(check, tester, model_dir):
    extra, config_kwargs = RUN[check]
    method = getattr(tester, f"_test_{check}")
    if check == "passing_input_embeds_works":
        method(check, model_dir, HFTConfig, dict(config_kwargs))
    else:
        method(model_dir, HFTConfig, dict(config_kwargs), *extra)


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
}


@pytest.fixture(scope="module")
def custom(common):
    return load_custom_models()


def test_every_custom_model_check_is_accounted_for(custom):
    offered = set(generic_checks(custom.TestPeftCustomModel, "config_kwargs"))
    assert offered == set(CUSTOM_RUN) | set(CUSTOM_SKIPPED), (
        sorted(offered - set(CUSTOM_RUN) - set(CUSTOM_SKIPPED)),
        sorted((set(CUSTOM_RUN) | set(CUSTOM_SKIPPED)) - offered),
    )
    assert not set(CUSTOM_RUN) & set(CUSTOM_SKIPPED)
    assert set(generic_checks(custom.TestMultipleActiveAdapters, "config_kwargs_1")) == set(MULTI_RUN)


def _run_upstream(method, *args, **kwargs) -> None:
    """Run an upstream check; one that skips itself fails here (it must be listed in CUSTOM_SKIPPED instead)."""
    try:
        method(*args, **kwargs)
    except pytest.skip.Exception as exc:
        pytest.fail(f"{method.__name__} skipped itself ({exc}); list it in CUSTOM_SKIPPED with the reason instead.")


@pytest.mark.parametrize("row", CUSTOM_ROWS, ids=[row[0] for row in CUSTOM_ROWS])
@pytest.mark.parametrize("check", CUSTOM_RUN)
def test_custom_model_check(check, row, custom, tmp_path):
    tester = custom.TestPeftCustomModel()
    tester.torch_device = "cpu"
    method = getattr(tester, check)
    kwargs = {"tmp_path": tmp_path} if "tmp_path" in inspect.signature(method).parameters else {}
    name, model_id, config_kwargs = row
    _run_upstream(method, name, model_id, HFTConfig, dict(config_kwargs), **kwargs)


@pytest.mark.parametrize("row", MULTI_ROWS, ids=[row[0] for row in MULTI_ROWS])
@pytest.mark.parametrize("check", MULTI_RUN)
def test_multiple_active_adapters_check(check, row, custom):
    tester = custom.TestMultipleActiveAdapters()
    tester.torch_device = "cpu"
    name, method_name, kwargs_1, kwargs_2 = row
    _run_upstream(getattr(tester, check), name, method_name, HFTConfig, dict(kwargs_1), dict(kwargs_2))
