"""PEFT's own generic checks (``PeftCommonTester`` from the installed peft version's sdist) run against HFT.

Every check PEFT offers is either run here or listed in ``SKIPPED`` with the reason; docs/conformance.md carries the
same list. ``test_every_upstream_check_is_accounted_for`` fails when a new peft version adds a check, so nothing is
skipped silently.
"""

from __future__ import annotations

import pytest
import torch
from peft_upstream import load_testing_common, upstream_checks
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
    # The base model's state dict of an HFT model *is* its current weights (HFT trains them in place), so this check
    # holds for an adapter that has not moved the weights yet.
    "get_base_model_state_dict": ((), {}),
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
