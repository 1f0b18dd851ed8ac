"""Every failed load leaves the model bit-identical and usable (issue 19, rows 2 and 3).

The load entry points (``PeftModel.from_pretrained``, ``PeftModel.load_adapter`` under a new name and under an
existing one, as ``Trainer(resume_from_checkpoint=...)`` does, and transformers' ``model.load_adapter``) are tried with
each kind of bad checkpoint: another selection (a model rebuilt with another seed), another base, NaN values, a
truncated file. After each refusal every parameter and buffer, every ``requires_grad`` flag, ``peft_config``, the
active adapter, the module tree and the train/eval mode are as before, and the model still runs forward, saves
and disables its adapter; a good checkpoint then loads.
"""

from __future__ import annotations

import copy
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_models import batch, tiny_model, train_steps

import peft_hft
from peft_hft import BaseMismatchError

TRAINED_SEED = 5  # the selection seed of the model under test (and of every checkpoint but "other selection")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loads")

    def trained(base_seed: int, selection_seed: int, name: str) -> Path:
        model = get_peft_model(tiny_model("llama", seed=base_seed), peft_hft.HFTConfig(seed=selection_seed))
        train_steps(model, steps=1, lr=1e-2, seed=selection_seed + 1)
        model.save_pretrained(root / name)
        return root / name

    paths = {
        "good": trained(0, TRAINED_SEED, "good"),
        "other selection": trained(0, 0, "other-selection"),
        "other base": trained(7, TRAINED_SEED, "other-base"),
    }
    for name, damage in (("nan values", "nan"), ("truncated file", "truncate")):
        target = shutil.copytree(paths["good"], root / name.replace(" ", "-"))
        weights = target / "adapter_model.safetensors"
        if damage == "nan":
            tensors = load_file(weights)
            first = sorted(tensors)[0]
            tensors[first] = torch.full_like(tensors[first], float("nan"))
            save_file(tensors, weights, metadata={"format": "pt"})
        else:
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        paths[name] = target
    return paths


def peft_model_under_test() -> PeftModel:
    model = get_peft_model(tiny_model("llama"), peft_hft.HFTConfig(seed=TRAINED_SEED))
    train_steps(model, steps=1, lr=1e-2, seed=11)
    return model


def snapshot(model: torch.nn.Module) -> dict:
    """Everything a failed load could change, as comparable values."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    configs = getattr(model, "peft_config", None)
    return {
        "parameters": {n: (p.detach().clone(), p.dtype) for n, p in model.named_parameters(remove_duplicate=False)},
        "buffers": {n: b.clone() for n, b in model.named_buffers(remove_duplicate=False)},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)},
        "peft_config": {k: copy.deepcopy(c.to_dict()) for k, c in configs.items()} if configs is not None else None,
        "active": getattr(model, "active_adapter", None) if isinstance(model, PeftModel) else None,
        "modules": [n for n, _ in model.named_modules()],
        "attributes": sorted(vars(base)),
        "training": [m.training for m in model.modules()],
    }


def assert_identical(before: dict, after: dict) -> None:
    assert after.keys() == before.keys()
    for key in ("requires_grad", "peft_config", "active", "modules", "attributes", "training"):
        assert after[key] == before[key], key
    assert after["parameters"].keys() == before["parameters"].keys()
    for name, (value, dtype) in before["parameters"].items():
        now, now_dtype = after["parameters"][name]
        assert now_dtype == dtype and torch.equal(now, value), name
    assert after["buffers"].keys() == before["buffers"].keys()
    assert all(torch.equal(after["buffers"][n], b) for n, b in before["buffers"].items())


def load_from_pretrained(model, path):
    return PeftModel.from_pretrained(model, path)


def load_new_name(model, path):
    return model.load_adapter(path, adapter_name="other")


def load_existing_name(model, path):
    return model.load_adapter(path, adapter_name="default", is_trainable=True)


def load_transformers(model, path):
    return model.load_adapter(str(path), adapter_name="other")


# entry point -> (how to call it, whether it works on a PeftModel (else on a plain model))
LOADS = {
    "PeftModel.from_pretrained": (load_from_pretrained, False),
    "load_adapter, new name": (load_new_name, True),
    "load_adapter, existing name": (load_existing_name, True),
    "transformers load_adapter": (load_transformers, False),
}
BAD = ["other base", "nan values", "truncated file", "other selection"]


def expected_error(load: str, bad: str):
    if bad == "other base":
        return BaseMismatchError, "differ in this model"
    if bad == "other selection":
        return ValueError, "trains another selection than the HFT adapter 'default'.*seed=0 in the checkpoint.*seed=5"
    return ValueError, "NaN/Inf" if bad == "nan values" else ""


CASES = [(load, bad) for load in LOADS for bad in BAD if bad != "other selection" or load.endswith("existing name")]


@pytest.mark.parametrize("load, bad", CASES)
def test_a_failed_load_leaves_the_model_identical_and_usable(checkpoints, tmp_path, load, bad):
    call, on_peft_model = LOADS[load]
    model = peft_model_under_test() if on_peft_model else tiny_model("llama")
    model.eval()
    inputs = batch()
    with torch.no_grad():
        logits = model(**inputs).logits
    before = snapshot(model)
    error, match = expected_error(load, bad)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(error, match=match):
            call(model, checkpoints[bad])
    assert not [w for w in caught if "records no base fingerprint" in str(w.message)]  # row 3: no false warning
    assert_identical(before, snapshot(model))

    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, logits)
    if on_peft_model:
        with torch.no_grad(), model.disable_adapter():
            base_logits = model(**inputs).logits
        assert not torch.equal(base_logits, logits)  # the trained adapter is still there, and can be disabled
        model.save_pretrained(tmp_path / "saved")
        reloaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "saved")
        with torch.no_grad():
            torch.testing.assert_close(reloaded(**inputs).logits, logits, rtol=0, atol=1e-6)
    loaded = call(model, checkpoints["good"])  # a retry with a good checkpoint works
    target = loaded if isinstance(loaded, PeftModel) else model
    assert "default" in target.peft_config or "other" in target.peft_config


def test_resume_into_the_existing_adapter_checks_the_base_and_loads_the_checkpoint(checkpoints):
    """Row 3: load_adapter(ckpt, "default") is checked against the checkpoint's base fingerprint, without the false
    "records no base fingerprint" warning, and then holds the checkpoint's values."""
    model = peft_model_under_test()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.load_adapter(checkpoints["good"], adapter_name="default", is_trainable=True)
    assert not [w for w in caught if "records no base fingerprint" in str(w.message)]
    reference = PeftModel.from_pretrained(tiny_model("llama"), checkpoints["good"])
    expected = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        assert torch.equal(param, expected[name]), name
    assert model.peft_config["default"].base_fingerprint is not None
    assert any(p.requires_grad for p in model.parameters())
