"""An HFT adapter records the base it belongs to and refuses any other base unless the user opts out."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import batch, clone_state, tiny_model, train_steps

import peft_hft
from peft_hft.format import fingerprint as fp
from peft_hft.format.fingerprint import BaseMismatchError, skip_base_check


def logits(model):
    with torch.no_grad():
        return model(**batch(0)).logits


def train_and_save(path, dtype=torch.float32, seed=0):
    model = tiny_model("llama", layers=2, seed=seed, dtype=dtype)
    base = clone_state(model)
    peft_model = get_peft_model(model, peft_hft.HFTConfig(seed=0))
    train_steps(peft_model, steps=2, lr=5e-2)
    peft_model.save_pretrained(path)
    return peft_model, base


@pytest.fixture
def saved(tmp_path):
    peft_model, base = train_and_save(tmp_path / "adapter")
    return peft_model, base, tmp_path / "adapter"


def assert_untouched(model, before):
    assert not hasattr(model, "hft") and not hasattr(model, "peft_config")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_saved_config_records_a_digest_of_every_modified_base_tensor(saved):
    peft_model, base, path = saved
    config = json.loads((path / "adapter_config.json").read_text())
    record = config["base_fingerprint"]
    assert record["format"] == 2 and record["algorithm"] == "xxh3_128"
    assert sorted(record["tensors"]) == sorted(config["selected_parameters"])
    for name, entry in record["tensors"].items():
        assert entry["dtype"] == "float32" and entry["shape"] == list(base[name].shape)
        assert entry["xxh3_128"] == fp.digest(base[name])
        assert entry["rounded"] == {
            "bfloat16": fp.digest(base[name].to(torch.bfloat16)),
            "float16": fp.digest(base[name].to(torch.float16)),
        }
    assert "base_fingerprint" not in repr(peft_model.peft_config["default"])  # kept out of logs


def test_digest_is_the_xxh3_128_of_the_raw_little_endian_bytes():
    import hashlib

    import xxhash

    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    assert fp.digest(t) == xxhash.xxh3_128(t.numpy().tobytes()).hexdigest()
    assert fp.digest(t.t()) == xxhash.xxh3_128(t.t().contiguous().numpy().tobytes()).hexdigest()
    assert fp.digest(t, "sha256") == hashlib.sha256(t.numpy().tobytes()).hexdigest()
    # one bit of one element changes the digest
    flipped = t.clone()
    flipped.view(torch.int32)[1, 2] ^= 1
    assert fp.digest(flipped) != fp.digest(t)


def test_format_1_records_of_sha256_digests_still_verify_and_still_refuse(saved, tmp_path):
    """Adapters saved before the move to XXH3 record SHA-256 digests under format 1: they load onto their base (fp32
    and bf16, through the recorded roundings) and are still refused on another base, naming the algorithm."""
    _, base, path = saved
    old = tmp_path / "format-1"
    shutil.copytree(path, old)
    config = json.loads((old / "adapter_config.json").read_text())
    record = config["base_fingerprint"]
    for name, entry in record["tensors"].items():
        tensor = base[name]
        entry.pop("xxh3_128")
        entry["sha256"] = fp.digest(tensor, "sha256")
        entry["rounded"] = {d: fp.digest(tensor.to(getattr(torch, d)), "sha256") for d in entry["rounded"]}
    record.update(format=1, algorithm="sha256")
    (old / "adapter_config.json").write_text(json.dumps(config))
    fp.validate_fingerprint(record)

    loaded = PeftModel.from_pretrained(tiny_model("llama", layers=2, seed=0), old)
    assert loaded.peft_config["default"].base_fingerprint["algorithm"] == "sha256"
    PeftModel.from_pretrained(tiny_model("llama", layers=2, seed=0).to(torch.bfloat16), old)  # the recorded bf16 rounding matches

    other = tiny_model("llama", layers=2, seed=0)
    with torch.no_grad():
        other.get_parameter(sorted(record["tensors"])[0]).add_(1e-3)
    with pytest.raises(fp.BaseMismatchError, match=r"different values \(sha256 "):
        PeftModel.from_pretrained(other, old)


def test_a_record_whose_digests_do_not_fit_its_algorithm_is_malformed(saved):
    """A format-2 record with SHA-256-length digests (or the reverse) is refused, not compared."""
    _, _, path = saved
    record = json.loads((path / "adapter_config.json").read_text())["base_fingerprint"]
    fp.validate_fingerprint(record)
    long = {**record, "tensors": {n: {**e, "xxh3_128": "0" * 64} for n, e in record["tensors"].items()}}
    with pytest.raises(fp.FingerprintError, match="32-digit"):
        fp.validate_fingerprint(long)
    with pytest.raises(fp.FingerprintError, match="64-digit"):
        fp.validate_fingerprint({**record, "format": 1, "algorithm": "sha256"})
    with pytest.raises(fp.FingerprintError, match="unsupported base fingerprint algorithm 'md5'"):
        fp.validate_fingerprint({**record, "algorithm": "md5"})


def test_base_identity_is_recorded(tmp_path):
    model = tiny_model("llama", layers=2)
    model.name_or_path = "someone/tiny-llama"
    model.config._commit_hash = "a" * 40
    peft_model = get_peft_model(model, peft_hft.HFTConfig(init_weights=False))
    peft_model.save_pretrained(tmp_path)
    record = json.loads((tmp_path / "adapter_config.json").read_text())["base_fingerprint"]
    assert record["base_model"] == "someone/tiny-llama" and record["revision"] == "a" * 40


def test_another_base_is_refused_with_the_mismatching_tensors_listed(saved):
    _, _, path = saved
    other = tiny_model("llama", layers=2, seed=1)
    before = clone_state(other)
    with pytest.raises(BaseMismatchError) as info:
        PeftModel.from_pretrained(other, path)
    message = str(info.value)
    assert "The HFT adapter 'default' was made for" in message
    assert "model.layers.0.self_attn" in message and "different values" in message
    assert "skip_base_check" in message and "PEFT_HFT_SKIP_BASE_CHECK" in message
    assert_untouched(other, before)
    assert all(p.requires_grad for p in other.parameters())


def test_a_single_changed_tensor_is_named(saved):
    peft_model, base, path = saved
    selected = peft_model.peft_config["default"].selected_parameters
    victim = selected[len(selected) // 2]
    other = tiny_model("llama", layers=2)
    with torch.no_grad():
        other.get_parameter(victim)[0, 0] += 1e-3
    with pytest.raises(BaseMismatchError, match=rf"1 of the {len(selected)} base tensors .*\n  - {victim}: different"):
        PeftModel.from_pretrained(other, path)


def test_resized_vocabulary_is_refused_naming_the_embeddings(saved):
    _, _, path = saved
    other = tiny_model("llama", layers=2)
    other.resize_token_embeddings(120)
    before = clone_state(other)
    with pytest.raises(ValueError, match=r"model\.embed_tokens\.weight: adapter \(100, 32\) vs model \(120, 32\)"):
        PeftModel.from_pretrained(other, path)
    assert_untouched(other, before)


def test_opting_out_with_the_context_manager_or_the_environment(saved, monkeypatch):
    peft_model, _, path = saved
    diffs = peft_model.base_model.ledger.diffs("default")
    other = tiny_model("llama", layers=2, seed=1)
    other_base = clone_state(other)
    with skip_base_check():
        loaded = PeftModel.from_pretrained(other, path)
    state = loaded.get_base_model().state_dict()
    for name, diff in diffs.items():
        torch.testing.assert_close(state[name], other_base[name] + diff, rtol=0, atol=1e-6)
    with pytest.raises(BaseMismatchError):  # the opt-out ends with the block
        PeftModel.from_pretrained(tiny_model("llama", layers=2, seed=1), path)
    monkeypatch.setenv("PEFT_HFT_SKIP_BASE_CHECK", "1")
    PeftModel.from_pretrained(tiny_model("llama", layers=2, seed=1), path)


@pytest.mark.parametrize(
    "trained_in, loaded_in",
    [(torch.float32, torch.bfloat16), (torch.float32, torch.float16), (torch.bfloat16, torch.float32)],
)
def test_a_base_in_another_dtype_matches_when_it_rounds_to_the_same_values(tmp_path, trained_in, loaded_in):
    fp32 = tiny_model("llama", layers=2)
    model = tiny_model("llama", layers=2).to(trained_in)
    peft_model = get_peft_model(model, peft_hft.HFTConfig(init_weights=False))
    peft_model.save_pretrained(tmp_path)
    expected = logits(peft_model.to(loaded_in))
    loaded = PeftModel.from_pretrained(fp32.to(loaded_in), tmp_path)  # the fp32 checkpoint loaded in another dtype
    assert torch.allclose(logits(loaded), expected, atol=2e-2)


def test_bf16_and_fp16_bases_cannot_be_compared(tmp_path):
    model = tiny_model("llama", layers=2, dtype=torch.bfloat16)
    get_peft_model(model, peft_hft.HFTConfig(init_weights=False)).save_pretrained(tmp_path)
    with pytest.raises(BaseMismatchError, match="dtype float16 here cannot be compared with the recorded bfloat16"):
        PeftModel.from_pretrained(tiny_model("llama", layers=2, dtype=torch.float16), tmp_path)


def test_digests_of_the_originals_are_computed_once(monkeypatch, tmp_path):
    model = tiny_model("llama", layers=2)
    peft_model = get_peft_model(model, peft_hft.HFTConfig(init_weights=False))
    calls = []
    original = fp.tensor_fingerprint
    monkeypatch.setattr(fp, "tensor_fingerprint", lambda t: calls.append(1) or original(t))
    peft_model.save_pretrained(tmp_path / "a")
    first = len(calls)
    train_steps(peft_model, steps=1)
    peft_model.save_pretrained(tmp_path / "b")
    assert first == len(peft_model.peft_config["default"].selected_parameters) and len(calls) == first
    a = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["base_fingerprint"]
    b = json.loads((tmp_path / "b" / "adapter_config.json").read_text())["base_fingerprint"]
    assert a == b


def test_adapter_without_fingerprint_loads_with_a_warning(saved):
    peft_model, _, path = saved
    config = json.loads((path / "adapter_config.json").read_text())
    del config["base_fingerprint"]
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="records no base fingerprint"):
        loaded = PeftModel.from_pretrained(tiny_model("llama", layers=2), path)
    assert torch.allclose(logits(loaded), logits(peft_model), atol=1e-5)


def test_transformers_load_adapter_is_checked_too(saved):
    _, _, path = saved
    other = tiny_model("llama", layers=2, seed=1)
    before = clone_state(other)
    with pytest.raises(BaseMismatchError):
        other.load_adapter(str(path))
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


def test_second_adapter_on_the_wrong_base_leaves_the_first_alone(saved, tmp_path):
    peft_model, _, path = saved
    train_and_save(tmp_path / "foreign", seed=1)
    model = PeftModel.from_pretrained(tiny_model("llama", layers=2), path)
    expected = logits(model)
    with pytest.raises(BaseMismatchError):
        model.load_adapter(tmp_path / "foreign", adapter_name="foreign")
    assert list(model.peft_config) == ["default"]
    assert torch.equal(logits(model), expected)


def test_malformed_fingerprint_is_refused(saved):
    _, _, path = saved
    config = json.loads((path / "adapter_config.json").read_text())
    config["base_fingerprint"] = {"format": 1}
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="malformed base_fingerprint"):
        PeftModel.from_pretrained(tiny_model("llama", layers=2), path)
