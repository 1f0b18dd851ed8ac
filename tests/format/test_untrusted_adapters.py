"""Adapters are untrusted input: every damaged or hostile adapter is refused with a clear error and changes nothing.

One test per row of issue 12's table (a tiny Llama, a normally saved adapter, then the files edited as a user or an
attacker would), plus the checks that a failed load leaves the model exactly as it was and that a retry works.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_models import batch, tiny_model

import peft_hft
from peft_hft import HFTConfig
from peft_hft.cli.main import main as cli
from peft_hft.format.fingerprint import BaseMismatchError
from peft_hft.format.keys import ADAPTER_CONFIG, ADAPTER_WEIGHTS, diff_key
from peft_hft.format.reader import AdapterFormatError, allow_non_finite, read_adapter

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch(0)).logits


def snapshot(model: torch.nn.Module) -> dict:
    """Everything a failed load must leave as it was: values (bit for bit), flags, attributes, submodules."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "attributes": sorted(model.__dict__),
        "modules": sorted(name for name, _ in model.named_modules()),
        "flags": {k: model.__dict__.get(k) for k in ("peft_config", "_hf_peft_config_loaded")},
    }


def assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["requires_grad"] == before["requires_grad"]
    assert after["attributes"] == before["attributes"]
    assert after["modules"] == before["modules"]
    assert after["flags"] == before["flags"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
    assert not hasattr(model, "hft") and not hasattr(model, "peft_config")


@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def saved(request, tmp_path):
    """(adapter directory, logits of a clean load of it, dtype): an adapter that changes the outputs, saved with plain
    float diffs (the encoded formats' damage cases are in test_encodings.py)."""
    dtype = request.param
    model = tiny_model("llama", dtype=dtype)
    peft_model = get_peft_model(model, HFTConfig(init_weights=False, seed=0, diff_encoding="float"))
    path = tmp_path / "adapter"
    peft_model.save_pretrained(path)
    tuned = logits(PeftModel.from_pretrained(tiny_model("llama", dtype=dtype), path))
    assert not torch.equal(tuned, logits(tiny_model("llama", dtype=dtype)))
    return path, tuned, dtype


def edit_weights(path: Path, edit) -> None:
    tensors = load_file(path / ADAPTER_WEIGHTS)
    edit(tensors)
    save_file(tensors, path / ADAPTER_WEIGHTS, metadata={"format": "pt"})


def edit_config(path: Path, edit) -> None:
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    edit(config)
    (path / ADAPTER_CONFIG).write_text(json.dumps(config))


def damaged_copy(saved_dir: Path, tmp_path: Path, name: str) -> Path:
    out = tmp_path / name
    shutil.copytree(saved_dir, out)
    return out


def refused_and_retry_works(bad: Path, good: Path, tuned: torch.Tensor, dtype, match: str, error=AdapterFormatError):
    """Loading ``bad`` raises ``error`` matching ``match`` and changes nothing; loading ``good`` then works."""
    base = tiny_model("llama", dtype=dtype)
    before = snapshot(base)
    with pytest.raises(error, match=match):
        PeftModel.from_pretrained(base, bad)
    assert_unchanged(base, before)
    model = PeftModel.from_pretrained(base, good)
    assert torch.equal(logits(model), tuned)
    return base


def test_extra_base_weight_key_is_refused(saved, tmp_path):
    path, tuned, dtype = saved
    bad = damaged_copy(path, tmp_path, "extra-key")
    edit_weights(bad, lambda t: t.update({f"base_model.model.{Q_PROJ}": torch.zeros(32, 32, dtype=dtype)}))
    refused_and_retry_works(bad, path, tuned, dtype, match=rf"not HFT diffs.*{Q_PROJ}")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_diff_is_refused_unless_allowed(saved, tmp_path, value):
    path, tuned, dtype = saved
    bad = damaged_copy(path, tmp_path, "nan")
    name = json.loads((path / ADAPTER_CONFIG).read_text())["selected_parameters"][0]

    def poison(tensors):
        tensors[diff_key(name)] = torch.full_like(tensors[diff_key(name)], value)

    edit_weights(bad, poison)
    refused_and_retry_works(bad, path, tuned, dtype, match=rf"{diff_key(name)}.*NaN/Inf.*allow_non_finite")
    with allow_non_finite():
        model = PeftModel.from_pretrained(tiny_model("llama", dtype=dtype), bad)
    assert not torch.isfinite(logits(model)).all()


def test_integer_diff_is_refused(saved, tmp_path):
    path, tuned, dtype = saved
    bad = damaged_copy(path, tmp_path, "int")
    edit_weights(bad, lambda t: t.update({k: v.to(torch.int32) for k, v in list(t.items())[:1]}))
    refused_and_retry_works(bad, path, tuned, dtype, match="int32")


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_truncated_or_random_weights_change_nothing_and_a_retry_works(saved, tmp_path, damage):
    path, tuned, dtype = saved
    bad = damaged_copy(path, tmp_path, damage)
    data = (bad / ADAPTER_WEIGHTS).read_bytes()
    damaged = data[: len(data) // 2] if damage == "truncated" else torch.randint(0, 256, (len(data),)).byte().numpy()
    (bad / ADAPTER_WEIGHTS).write_bytes(bytes(damaged))
    refused_and_retry_works(bad, path, tuned, dtype, match="safetensors|truncated|outside the file")


def test_missing_weights_file_names_the_directory(saved, tmp_path):
    path, tuned, dtype = saved
    bad = damaged_copy(path, tmp_path, "no-weights")
    (bad / ADAPTER_WEIGHTS).unlink()
    refused_and_retry_works(bad, path, tuned, dtype, match=rf"{bad}.*has no {ADAPTER_WEIGHTS}", error=FileNotFoundError)


@pytest.mark.parametrize("edit", ["empty", "partial", "not-a-digest"])
def test_empty_or_partial_fingerprint_is_an_error_not_verified(saved, tmp_path, edit):
    path, tuned, dtype = saved
    bad = damaged_copy(path, tmp_path, f"fp-{edit}")

    def change(config):
        records = config["base_fingerprint"]["tensors"]
        if edit == "empty":
            records.clear()
        elif edit == "partial":
            records.pop(next(iter(records)))
        else:
            next(iter(records.values()))["xxh3_128"] = "0"

    edit_config(bad, change)
    match = {"empty": "non-empty", "partial": "records no base tensor", "not-a-digest": "hex digest"}[edit]
    refused_and_retry_works(bad, path, tuned, dtype, match=match)


def test_emptied_fingerprint_no_longer_loads_onto_another_base(saved, tmp_path):
    path, _, dtype = saved
    bad = damaged_copy(path, tmp_path, "fp-emptied")
    edit_config(bad, lambda c: c["base_fingerprint"].update(tensors={}))
    with pytest.raises(AdapterFormatError, match="base_fingerprint"):
        PeftModel.from_pretrained(tiny_model("llama", seed=1, dtype=dtype), bad)


@pytest.mark.parametrize("damage", ["no-peft-type", "not-json", "peft-type-number", "list"])
def test_malformed_config_names_the_file_and_field(saved, tmp_path, damage):
    path, tuned, dtype = saved
    bad = damaged_copy(path, tmp_path, damage)
    text = (bad / ADAPTER_CONFIG).read_text()
    if damage == "no-peft-type":
        edit_config(bad, lambda c: c.pop("peft_type"))
    elif damage == "not-json":
        (bad / ADAPTER_CONFIG).write_text(text[: len(text) // 2])
    elif damage == "peft-type-number":
        edit_config(bad, lambda c: c.update(peft_type=3))
    else:
        (bad / ADAPTER_CONFIG).write_text("[1, 2]")
    if damage == "list":  # nothing marks it as HFT: it is any method's broken config, and PEFT reports it
        refused_and_retry_works(bad, path, tuned, dtype, match="list indices", error=TypeError)
        return
    match = {"no-peft-type": "no 'peft_type'", "not-json": "not valid JSON", "peft-type-number": "'peft_type' must"}[damage]
    refused_and_retry_works(bad, path, tuned, dtype, match=rf"{bad / ADAPTER_CONFIG}.*{match}|{match}.*")


def test_wrong_field_types_name_the_field(saved, tmp_path):
    path, tuned, dtype = saved
    for field, value in [("selected_parameters", "model.norm.weight"), ("ratio", "half"), ("seed", 1.5),
                         ("inference_mode", "yes"), ("diff_dtype", "int8"), ("trainable_token_indices", "all")]:
        bad = damaged_copy(path, tmp_path, f"field-{field}")
        edit_config(bad, lambda c: c.update({field: value}))  # noqa: B023
        with pytest.raises(AdapterFormatError, match=rf"{ADAPTER_CONFIG}.*{field}"):
            read_adapter(bad)


def test_transformers_load_adapter_onto_a_wrong_base_leaves_the_flags(saved, tmp_path):
    path, tuned, dtype = saved
    other = tiny_model("llama", seed=1, dtype=dtype)
    before = snapshot(other)
    with pytest.raises(BaseMismatchError):
        other.load_adapter(str(path))
    assert_unchanged(other, before)
    with pytest.raises(ValueError, match="No adapter loaded"):
        other.active_adapters()  # as on a model that never had an adapter
    right = tiny_model("llama", dtype=dtype)
    right.load_adapter(str(path))
    assert right.active_adapters() == ["default"]
    assert torch.equal(logits(right), tuned)


@pytest.mark.parametrize("name", ["../escape", "/tmp/absolute", "a/b", "..", "", "x\\y"])
def test_adapter_names_that_are_paths_are_refused(tmp_path, name):
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match="Invalid adapter name"):
        get_peft_model(model, HFTConfig(), adapter_name=name)
    assert_unchanged(model, before)
    peft_model = get_peft_model(model, HFTConfig(init_weights=False))
    with pytest.raises(ValueError, match="Invalid adapter name"):
        peft_model.add_adapter(name, HFTConfig())
    assert list(peft_model.peft_config) == ["default"]
    out = tmp_path / "nest" / "out"
    peft_model.save_pretrained(out)
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert written == [f"nest/out/{f}" for f in ("README.md", ADAPTER_CONFIG, ADAPTER_WEIGHTS)]


def test_merge_cli_refuses_an_output_inside_or_equal_to_an_input(saved, tmp_path):
    path, _, dtype = saved
    base_dir = tmp_path / "base"
    tiny_model("llama", dtype=dtype).save_pretrained(base_dir)
    files = {p: p.read_bytes() for p in [*base_dir.iterdir(), *path.iterdir()]}
    for out in [base_dir, base_dir / "merged", path, path / "merged", tmp_path]:
        for extra in ([], ["--overwrite"]):
            assert cli(["merge", str(base_dir), str(path), str(out), "--quiet", *extra]) == 1
    assert {p: p.read_bytes() for p in [*base_dir.iterdir(), *path.iterdir()]} == files
    assert cli(["merge", str(base_dir), str(path), str(tmp_path / "merged"), "--quiet"]) == 0


@pytest.mark.parametrize("damage", ["nan", "int32", "extra-key"])
def test_merge_cli_refuses_damaged_adapters_and_writes_nothing(saved, tmp_path, damage, capsys):
    path, _, dtype = saved
    base_dir = tmp_path / "base"
    tiny_model("llama", dtype=dtype).save_pretrained(base_dir)
    bad = damaged_copy(path, tmp_path, damage)

    def edit(tensors):
        key = next(iter(tensors))
        if damage == "nan":
            tensors[key] = torch.full_like(tensors[key], float("nan"))
        elif damage == "int32":
            tensors[key] = tensors[key].to(torch.int32)
        else:
            tensors[f"base_model.model.{Q_PROJ}"] = torch.zeros(32, 32, dtype=dtype)

    edit_weights(bad, edit)
    assert cli(["merge", str(base_dir), str(bad), str(tmp_path / "merged"), "--quiet"]) == 1
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("damage", ["truncated", "nan"])
def test_inspect_exits_non_zero_on_a_damaged_adapter(saved, tmp_path, damage, capsys):
    path, _, _ = saved
    bad = damaged_copy(path, tmp_path, damage)
    if damage == "truncated":
        data = (bad / ADAPTER_WEIGHTS).read_bytes()
        (bad / ADAPTER_WEIGHTS).write_bytes(data[: len(data) // 2])
    else:
        edit_weights(bad, lambda t: t.update({k: torch.full_like(v, float("nan")) for k, v in t.items()}))
    assert cli(["inspect", str(bad)]) == 1
    assert str(bad) in capsys.readouterr().err
    assert cli(["inspect", str(path)]) == 0


def test_stage_history_reader_is_the_strict_reader(saved, tmp_path):
    from peft_hft.continual.history import read_diffs

    path, _, _ = saved
    bad = damaged_copy(path, tmp_path, "history")
    edit_weights(bad, lambda t: t.update({f"base_model.model.{Q_PROJ}": torch.zeros(32, 32)}))
    with pytest.raises(AdapterFormatError, match="not HFT diffs"):
        read_diffs(bad)
    assert set(read_diffs(path)) == set(json.loads((path / ADAPTER_CONFIG).read_text())["selected_parameters"])


def test_pickle_weights_are_never_loaded(saved, tmp_path):
    path, _, _ = saved
    bad = damaged_copy(path, tmp_path, "pickle")
    torch.save(load_file(bad / ADAPTER_WEIGHTS), bad / "adapter_model.bin")
    (bad / ADAPTER_WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match="pickle"):
        PeftModel.from_pretrained(tiny_model("llama"), bad)


def test_allow_non_finite_is_scoped():
    assert not peft_hft.format.reader.non_finite_allowed()
    with allow_non_finite():
        assert peft_hft.format.reader.non_finite_allowed()
    assert not peft_hft.format.reader.non_finite_allowed()


def test_load_adapter_into_a_peft_model_changes_nothing_on_failure(saved, tmp_path):
    path, tuned, dtype = saved
    bad = damaged_copy(path, tmp_path, "second")
    data = (bad / ADAPTER_WEIGHTS).read_bytes()
    (bad / ADAPTER_WEIGHTS).write_bytes(data[: len(data) // 2])
    model = PeftModel.from_pretrained(tiny_model("llama", dtype=dtype), path, is_trainable=True)
    before = snapshot(model.get_base_model())
    with pytest.raises(AdapterFormatError):
        model.load_adapter(bad, "other")
    after = snapshot(model.get_base_model())
    assert after["requires_grad"] == before["requires_grad"] and after["modules"] == before["modules"]
    assert list(model.peft_config) == ["default"] and list(model.base_model.ledger.hft_adapters) == ["default"]
    assert torch.equal(logits(model), tuned)
    model.load_adapter(path, "other")  # the retry works
    assert sorted(model.peft_config) == ["default", "other"]
