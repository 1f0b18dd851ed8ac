"""Diff encodings (peft_hft/format/encoding.py): the lossless default reloads and merges bit-exactly, the lossy ones
decode within their bounds through every reading path, and damaged encodings are refused with the model unchanged."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from test_untrusted_adapters import assert_unchanged, snapshot
from tiny_models import tiny_model

from peft_hft import HFTConfig
from peft_hft.format.encoding import EncodingError, parse_encoding
from peft_hft.format.keys import ADAPTER_CONFIG, ADAPTER_WEIGHTS, diff_key, part_key
from peft_hft.format.reader import AdapterFormatError, read_adapter
from peft_hft.ops.compress import compress_adapter
from peft_hft.ops.merge import merge_checkpoint
from peft_hft.tuner.layer import find_ledger

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IDS = ["fp32", "bf16", "fp16"]
LOSSY = ["int8", "int4", "int4:32", "dare:0.5", "dare:0.9:3", "sign"]


def trained(dtype: torch.dtype, encoding=None, seed: int = 0):
    """A tiny Llama in ``dtype`` with an HFT adapter whose weights moved by a few ulps (as training does), a few by
    many (exceptions), and one through zero."""
    model = tiny_model("llama", dtype=dtype)
    peft_model = get_peft_model(model, HFTConfig(seed=0, diff_encoding=encoding))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in peft_model.peft_config["default"].selected_parameters:
            param = model.get_parameter(name)
            if dtype == torch.float32:
                param.data = param.data + torch.randn(param.shape, generator=g) * 2e-3
            else:  # a few ulps up or down, as the rounded master moves in a short bf16/fp16 run
                steps = torch.randint(-4, 5, param.shape, generator=g).to(torch.int16)
                param.data = (param.data.view(torch.int16) + steps).view(dtype)
            param.data.view(-1)[0] = -param.data.view(-1)[0] + 0.5  # a large move
    return model, peft_model


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    view = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[a.dtype]
    return a.dtype == b.dtype and torch.equal(a.contiguous().view(view), b.contiguous().view(view))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_exact_encoding_reloads_and_merges_bit_exactly(dtype, tmp_path):
    model, peft_model = trained(dtype, "exact")
    tuned = weights(model)
    peft_model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert config["diff_encoding"] == "exact"
    stored = load_file(tmp_path / "adapter" / ADAPTER_WEIGHTS)
    if dtype != torch.float32:  # steps in int8, the big moves apart
        name = config["selected_parameters"][0]
        assert stored[diff_key(name)].dtype == torch.int8 and stored[part_key(name, "exc_idx")].numel() >= 1
    loaded = PeftModel.from_pretrained(tiny_model("llama", dtype=dtype), tmp_path / "adapter")
    for key, value in loaded.get_base_model().state_dict().items():
        assert bits_equal(value, tuned[key]), key
    merged = loaded.merge_and_unload()
    assert all(bits_equal(v, tuned[k]) for k, v in merged.state_dict().items())
    # the streaming merge of the same base checkpoint
    tiny_model("llama", dtype=dtype).save_pretrained(tmp_path / "base", max_shard_size="20KB")
    merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", progress=False)
    on_disk = {}
    for shard in (tmp_path / "merged").glob("*.safetensors"):
        on_disk.update(load_file(shard))
    for key, value in on_disk.items():
        assert bits_equal(value, tuned[key]), key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_exact_is_the_default_for_low_precision_and_a_quarter_of_fp32_diffs(dtype, tmp_path):
    model, peft_model = trained(dtype)
    peft_model.save_pretrained(tmp_path / "exact")
    peft_model.save_pretrained(tmp_path / "float", diff_encoding="float")
    assert json.loads((tmp_path / "exact" / ADAPTER_CONFIG).read_text())["diff_encoding"] == "exact"
    assert json.loads((tmp_path / "float" / ADAPTER_CONFIG).read_text())["diff_encoding"] == "float"
    assert peft_model.peft_config["default"].diff_encoding == "exact"  # the resolved default, not the override
    exact = read_adapter(tmp_path / "exact").stored_bytes()
    plain = read_adapter(tmp_path / "float").stored_bytes()
    assert plain == 4 * sum(model.get_parameter(n).numel() for n in peft_model.peft_config["default"].selected_parameters)
    assert exact < 0.3 * plain


def test_fp32_default_stays_float_and_exact_falls_back_to_full_values(tmp_path):
    model, peft_model = trained(torch.float32)
    peft_model.save_pretrained(tmp_path / "a")
    assert json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())["diff_encoding"] == "float"
    peft_model.save_pretrained(tmp_path / "b", diff_encoding="exact")
    stored = load_file(tmp_path / "b" / ADAPTER_WEIGHTS)
    assert {v.dtype for k, v in stored.items() if k.endswith("hft_diff.weight")} <= {torch.float32, torch.int8}


@pytest.mark.parametrize("encoding", LOSSY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lossy_encodings_decode_within_their_bounds(encoding, dtype, tmp_path):
    model, peft_model = trained(dtype)
    ledger = find_ledger(peft_model)
    diffs = ledger.diffs("default", torch.float32)
    peft_model.save_pretrained(tmp_path / "adapter", diff_encoding=encoding)
    assert json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())["diff_encoding"] == encoding
    adapter = read_adapter(tmp_path / "adapter")
    spec = parse_encoding(encoding)
    for name, diff in diffs.items():
        decoded = adapter.diff(name)
        assert decoded.shape == diff.shape
        error = (decoded - diff).abs()
        if spec.kind in ("int8", "int4"):  # at most half a step of the block's scale (plus the bf16 scale rounding)
            qmax = 127 if spec.kind == "int8" else 7
            assert float(error.max()) <= float(diff.abs().max()) / qmax * 0.51 + 1e-7
        elif spec.kind == "dare":  # kept entries are the diff rescaled, dropped ones zero
            kept = decoded != 0
            assert 0.2 < float(kept.float().mean()) / (1 - spec.drop) < 1.8
            rescaled = diff[kept] / (1 - spec.drop)
            torch.testing.assert_close(decoded[kept], rescaled, rtol=1e-2, atol=1e-6)
        else:  # sign: |value| is the row's mean |diff|, signs agree
            assert bool((torch.sign(decoded) * torch.sign(diff) >= 0).all())
    # PeftModel loads the decoded values: base + decoded diff, in the model's dtype
    loaded = PeftModel.from_pretrained(tiny_model("llama", dtype=dtype), tmp_path / "adapter")
    base = tiny_model("llama", dtype=dtype)
    for name in diffs:
        expected = (base.get_parameter(name).float() + adapter.diff(name)).to(dtype)
        assert torch.equal(loaded.get_base_model().get_parameter(name), expected), name


@pytest.mark.parametrize("encoding", ["exact", "int4", "dare:0.9", "sign", "int8", "float"])
def test_compress_an_existing_adapter_equals_saving_in_that_encoding(encoding, tmp_path):
    model, peft_model = trained(torch.bfloat16)
    peft_model.save_pretrained(tmp_path / "float", diff_encoding="float")
    peft_model.save_pretrained(tmp_path / "direct", diff_encoding=encoding)
    tiny_model("llama", dtype=torch.bfloat16).save_pretrained(tmp_path / "base")
    result = compress_adapter(tmp_path / "float", tmp_path / "out", encoding, base=tmp_path / "base", progress=False)
    assert result.encoding == encoding and result.bytes_after <= result.bytes_before
    direct, compressed = load_file(tmp_path / "direct" / ADAPTER_WEIGHTS), load_file(tmp_path / "out" / ADAPTER_WEIGHTS)
    assert direct.keys() == compressed.keys()
    for key in direct:
        assert torch.equal(direct[key], compressed[key]), key
    # an exact adapter re-encodes again with the base; without it the command says what it needs
    with pytest.raises(ValueError, match="--base"):
        compress_adapter(tmp_path / "direct", tmp_path / "again", "exact", progress=False) if encoding == "exact" \
            else compress_adapter(tmp_path / "float", tmp_path / "again", "exact", progress=False)
    with pytest.raises(ValueError, match="ADAPTER directory"):
        compress_adapter(tmp_path / "float", tmp_path / "float" / "inside", encoding, base=tmp_path / "base")


def test_unknown_encodings_are_refused_up_front():
    for bad in ("int3", "dare:1.5", "int4:7", "exact:2", "", 5):
        with pytest.raises((EncodingError, ValueError)):
            parse_encoding(bad)
        with pytest.raises(ValueError, match="diff_encoding"):
            HFTConfig(diff_encoding=bad)


# ------------------------------------------------------------------------------------------------------------------
# Damaged encodings: refused before anything changes
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoded")
    model, peft_model = trained(torch.bfloat16)
    for encoding in ("exact", "int4", "dare:0.9", "sign"):
        peft_model.save_pretrained(root / encoding, diff_encoding=encoding)
    tiny_model("llama", dtype=torch.bfloat16).save_pretrained(root / "base")
    return root


def first(path) -> str:
    return json.loads((path / ADAPTER_CONFIG).read_text())["selected_parameters"][0]


DAMAGE = {
    # (encoding, what): (edit of the tensors, error message)
    ("exact", "index out of range"): (lambda t, n: t[part_key(n, "exc_idx")].__setitem__(0, 10**9), "outside the tensor"),
    ("exact", "negative index"): (lambda t, n: t[part_key(n, "exc_idx")].__setitem__(0, -1), "outside the tensor"),
    ("exact", "unsorted indices"): (lambda t, n: t.__setitem__(part_key(n, "exc_idx"), t[part_key(n, "exc_idx")].flip(0)
                                                   if t[part_key(n, "exc_idx")].numel() > 1 else torch.tensor([5, 5])),
                                    "strictly increasing|shape"),
    ("exact", "counts differ"): (lambda t, n: t.__setitem__(part_key(n, "exc_val"), t[part_key(n, "exc_val")][:0]),
                                 "shape"),
    ("exact", "more exceptions than elements"): (
        lambda t, n: (t.__setitem__(part_key(n, "exc_idx"), torch.arange(10**5)),
                      t.__setitem__(part_key(n, "exc_val"), torch.zeros(10**5, dtype=torch.bfloat16))),
        "exceptions for a tensor"),
    ("exact", "NaN exception"): (lambda t, n: t[part_key(n, "exc_val")].__setitem__(0, float("nan")), "non-finite"),
    ("exact", "steps of the wrong shape"): (lambda t, n: t.__setitem__(diff_key(n), t[diff_key(n)].reshape(-1)),
                                            "shape"),
    ("exact", "steps as int32"): (lambda t, n: t.__setitem__(diff_key(n), t[diff_key(n)].to(torch.int32)), "dtype"),
    ("exact", "missing part"): (lambda t, n: t.pop(part_key(n, "exc_val")), "missing"),
    ("exact", "step -128"): (lambda t, n: t[diff_key(n)].view(-1).__setitem__(1, -128), "-128"),
    ("int4", "wrong scale count"): (lambda t, n: t.__setitem__(part_key(n, "scales"), t[part_key(n, "scales")][:-1]),
                                    "scales.*shape"),
    ("int4", "NaN scale"): (lambda t, n: t[part_key(n, "scales")].__setitem__(0, float("nan")), "scales"),
    ("int4", "negative scale"): (lambda t, n: t[part_key(n, "scales")].__setitem__(0, -1.0), "scales"),
    ("int4", "packed size does not match the declared shape"): (
        lambda t, n: t.__setitem__(diff_key(n), torch.cat([t[diff_key(n)], t[diff_key(n)]])), "shape"),
    ("dare", "mask keeps more than stored"): (lambda t, n: t[part_key(n, "mask")].fill_(255), "keeps"),
    ("dare", "values without mask bits"): (
        lambda t, n: t.__setitem__(diff_key(n), torch.cat([t[diff_key(n)], t[diff_key(n)][:1]])), "keeps"),
    ("dare", "mask of the wrong size"): (lambda t, n: t.__setitem__(part_key(n, "mask"), t[part_key(n, "mask")][:-1]),
                                         "mask.*shape"),
    ("sign", "scales per row of the wrong count"): (
        lambda t, n: t.__setitem__(part_key(n, "scales"), torch.ones(3)), "scales.*shape"),
    ("sign", "bits of the wrong size"): (lambda t, n: t.__setitem__(diff_key(n), t[diff_key(n)][:-1]), "shape"),
    ("sign", "stray part"): (lambda t, n: t.__setitem__(part_key(n, "mask"), torch.zeros(1, dtype=torch.uint8)),
                             "not HFT diffs|unexpected"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE), ids=[f"{e}-{w}" for e, w in sorted(DAMAGE)])
def test_damaged_encodings_are_refused_with_the_model_unchanged(encoded, tmp_path, case):
    encoding, _ = case
    edit, match = DAMAGE[case]
    source = encoded / {"dare": "dare:0.9"}.get(encoding, encoding)
    bad = tmp_path / "bad"
    shutil.copytree(source, bad)
    tensors = load_file(bad / ADAPTER_WEIGHTS)
    edit(tensors, first(bad))
    save_file({k: v.contiguous() for k, v in tensors.items()}, bad / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    base = tiny_model("llama", dtype=torch.bfloat16)
    before = snapshot(base)
    with pytest.raises(AdapterFormatError, match=match):
        PeftModel.from_pretrained(base, bad)
    assert_unchanged(base, before)
    with pytest.raises(AdapterFormatError, match=match):  # the CLI's reader too
        merge_checkpoint(encoded / "base", bad, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    model = PeftModel.from_pretrained(base, source)  # a retry with the good adapter works
    assert any(not torch.equal(v, before["state"][k]) for k, v in model.get_base_model().state_dict().items())


def test_encoded_adapter_without_fingerprint_is_refused(encoded, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(encoded / "int4", bad)
    config = json.loads((bad / ADAPTER_CONFIG).read_text())
    del config["base_fingerprint"]
    (bad / ADAPTER_CONFIG).write_text(json.dumps(config))
    base = tiny_model("llama", dtype=torch.bfloat16)
    before = snapshot(base)
    with pytest.raises(AdapterFormatError, match="base_fingerprint"):
        PeftModel.from_pretrained(base, bad)
    assert_unchanged(base, before)


def test_a_state_dict_handed_over_directly_is_checked_once_there(encoded):
    """set_peft_model_state_dict with tensors that did not come from the reader: the tuner runs the reader's checks."""
    from peft import set_peft_model_state_dict

    from peft_hft.format.reader import validated_config

    adapter = read_adapter(encoded / "exact")
    assert validated_config(next(iter(adapter.state_dict().values())))["diff_encoding"] == "exact"
    state = {k: v.clone() for k, v in adapter.state_dict().items()}
    name = adapter.config["selected_parameters"][0]
    state[part_key(name, "exc_idx")][0] = 10**9
    config = HFTConfig(**{k: adapter.config[k] for k in ("selected_parameters", "base_fingerprint", "diff_encoding")})
    peft_model = get_peft_model(tiny_model("llama", dtype=torch.bfloat16), config)
    with pytest.raises(AdapterFormatError, match="outside the tensor"):
        set_peft_model_state_dict(peft_model, state)
    assert math.isfinite(1.0)


# ------------------------------------------------------------------------------------------------------------------
# Every reading path decodes an encoded adapter
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_adapters(tmp_path_factory):
    """A tiny bf16 chat model on disk (with tokenizer) and its adapter in two encodings, naming that base."""
    from tiny_tokenizer import build_tokenizer, chat_model

    root = tmp_path_factory.mktemp("paths")
    tokenizer = build_tokenizer()
    model = chat_model(tokenizer).to(torch.bfloat16)
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    peft_model = get_peft_model(model, HFTConfig(seed=0, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name in peft_model.peft_config["default"].selected_parameters:
            param = model.get_parameter(name)
            param.data = (param.data.view(torch.int16) + 3).view(torch.bfloat16)
    peft_model.peft_config["default"].base_model_name_or_path = str(root / "base")
    for encoding in ("exact", "int4"):
        peft_model.save_pretrained(root / encoding, diff_encoding=encoding)
    return root


def reference_weights(root, encoding: str) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.bfloat16)
    return weights(PeftModel.from_pretrained(base, root / encoding).get_base_model())


def same_weights(model, expected: dict[str, torch.Tensor]) -> bool:
    state = model.state_dict()
    return all(torch.equal(state[k], v) for k, v in expected.items() if k in state) and bool(state)


@pytest.mark.parametrize("encoding", ["exact", "int4"])
def test_auto_peft_model_and_transformers_load_adapter_decode(chat_adapters, encoding):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    expected = reference_weights(chat_adapters, encoding)
    base = weights(AutoModelForCausalLM.from_pretrained(chat_adapters / "base", dtype=torch.bfloat16))
    assert any(not torch.equal(base[k], v) for k, v in expected.items())
    auto = AutoPeftModelForCausalLM.from_pretrained(chat_adapters / encoding, dtype=torch.bfloat16)
    assert same_weights(auto.get_base_model(), expected)
    model = AutoModelForCausalLM.from_pretrained(chat_adapters / "base", dtype=torch.bfloat16)
    model.load_adapter(str(chat_adapters / encoding))
    assert same_weights(model, expected)


@pytest.mark.parametrize("encoding", ["exact", "int4"])
def test_lm_eval_peft_argument_and_merge_decode(chat_adapters, encoding, tmp_path):
    """lm-eval's HFLM with ``peft=`` (what ``lm_eval --model_args pretrained=...,peft=...`` builds) and
    ``peft-hft merge`` give the weights PeftModel.from_pretrained gives."""
    from lm_eval.models.huggingface import HFLM

    expected = reference_weights(chat_adapters, encoding)
    lm = HFLM(pretrained=str(chat_adapters / "base"), peft=str(chat_adapters / encoding), dtype="bfloat16",
              device="cpu", batch_size=1)
    assert same_weights(lm.model.get_base_model() if hasattr(lm.model, "get_base_model") else lm.model, expected)
    merge_checkpoint(chat_adapters / "base", chat_adapters / encoding, tmp_path / "merged", progress=False)
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert all(torch.equal(merged[k], v) for k, v in expected.items() if k in merged)


def test_continual_history_reads_encoded_stages(chat_adapters):
    from transformers import AutoModelForCausalLM

    from peft_hft.continual import read_diffs

    base = AutoModelForCausalLM.from_pretrained(chat_adapters / "base", dtype=torch.bfloat16)
    for encoding in ("exact", "int4"):
        expected = reference_weights(chat_adapters, encoding)
        diffs = read_diffs(chat_adapters / encoding, base)
        for name, diff in diffs.items():
            assert torch.equal((base.get_parameter(name).float() + diff).to(torch.bfloat16), expected[name]), name
    with pytest.raises(AdapterFormatError, match="against the base"):
        read_diffs(chat_adapters / "exact")


@pytest.mark.parametrize("encoding", ["float", "exact", "int4"])
def test_every_tensor_is_checked_exactly_once_per_load(encoding, tmp_path, monkeypatch):
    """Validate once: the reader checks each stored diff's values once; the tuner trusts what the reader returned."""
    import peft_hft.format.reader as reader
    import peft_hft.tuner.model as tuner_model

    model, peft_model = trained(torch.bfloat16)
    peft_model.save_pretrained(tmp_path / "adapter", diff_encoding=encoding)
    selected = peft_model.peft_config["default"].selected_parameters
    calls: list[str] = []
    original = reader.check_parts

    def counting(encoding, name, parts, shape, where, key=None):
        calls.append(name)
        return original(encoding, name, parts, shape, where, key)

    monkeypatch.setattr(reader, "check_parts", counting)
    monkeypatch.setattr(tuner_model, "check_parts", counting)
    finite_calls = []
    all_finite = reader._all_finite
    monkeypatch.setattr(reader, "_all_finite", lambda t: finite_calls.append(t.numel()) or all_finite(t))
    PeftModel.from_pretrained(tiny_model("llama", dtype=torch.bfloat16), tmp_path / "adapter")
    assert sorted(calls) == sorted(selected)  # once per tensor, all in the reader
    assert len(finite_calls) == (len(selected) if encoding == "float" else 0)
    # a state dict handed to set_peft_model_state_dict directly is checked in the tuner instead: still once
    from peft import set_peft_model_state_dict

    state = {k: v.clone() for k, v in load_file(tmp_path / "adapter" / ADAPTER_WEIGHTS).items()}
    calls.clear()
    fresh = get_peft_model(tiny_model("llama", dtype=torch.bfloat16), HFTConfig(seed=0, diff_encoding=encoding))
    fresh.peft_config["default"].base_fingerprint = json.loads(
        (tmp_path / "adapter" / ADAPTER_CONFIG).read_text())["base_fingerprint"]
    set_peft_model_state_dict(fresh, state)
    assert sorted(calls) == sorted(selected)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16], ids=["fp32base", "bf16base"])
def test_consuming_the_diff_gives_the_same_bits(dtype, base_dtype):
    from peft_hft.format.encoding import apply_diff

    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 33, generator=g).to(base_dtype)
    diff = torch.randn(64, 33, generator=g) * 1e-2
    expected = apply_diff(base, diff, dtype)
    kept = base.clone()
    got = apply_diff(base, diff.clone(), dtype, consume_diff=True)
    assert bits_equal(got, expected) and bits_equal(base, kept)  # the base is never written


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_loading_for_inference_copies_no_base_tensor_and_reuses_the_read_buffers(dtype, tmp_path):
    """Load time: the base tensors an inference adapter changes are kept by reference, and the tuned values are
    written into the tensors the reader filled; disabling gives the base back bit for bit, and training after such
    a load never writes into the base."""
    from peft import set_peft_model_state_dict

    _, peft_model = trained(dtype, "float")
    peft_model.save_pretrained(tmp_path / "adapter")
    selected = peft_model.peft_config["default"].selected_parameters
    base = tiny_model("llama", dtype=dtype)
    base_values = weights(base)
    stored = load_file(tmp_path / "adapter" / ADAPTER_WEIGHTS)
    expected = {n: (base_values[n].float() + stored[diff_key(n)].float()).to(dtype) for n in selected}
    pointers = {n: base.get_parameter(n).data_ptr() for n in selected}
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    ledger = find_ledger(loaded)
    assert {n: ledger._originals[n].data_ptr() for n in selected} == pointers  # no copy of the base
    assert all(bits_equal(base.get_parameter(n).data, expected[n]) for n in selected)
    with loaded.disable_adapter():
        assert all(bits_equal(base.get_parameter(n).data, base_values[n]) for n in selected)
    # made trainable later, the tensors get their own memory first: the base stays untouched
    ledger.set_requires_grad("default", True)
    for n in selected:
        base.get_parameter(n).data.add_(1.0)
    assert all(bits_equal(ledger._originals[n], base_values[n]) for n in selected)

    # the reader's tensors become the weights, so one state dict serves one load only
    adapter = read_adapter(tmp_path / "adapter")
    state = adapter.state_dict()
    fresh = get_peft_model(tiny_model("llama", dtype=dtype), HFTConfig(seed=0, inference_mode=True))
    fresh.peft_config["default"].base_fingerprint = adapter.config["base_fingerprint"]
    set_peft_model_state_dict(fresh, state)
    model = fresh.get_base_model()
    assert all(bits_equal(model.get_parameter(n).data, expected[n]) for n in selected)
    if dtype == torch.float32:
        assert {model.get_parameter(n).data_ptr() for n in selected} == {
            state[diff_key(n)].data_ptr() for n in selected}
    again = get_peft_model(tiny_model("llama", dtype=dtype), HFTConfig(seed=0, inference_mode=True))
    before = weights(again.get_base_model())
    with pytest.raises(ValueError, match="already loaded into a model.*read the adapter again"):
        set_peft_model_state_dict(again, state)
    after = weights(again.get_base_model())
    assert all(torch.equal(after[k], v) for k, v in before.items())


def _reference_from_steps(base: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """The step arithmetic spelled out: sign/magnitude to an ordered integer, add, clamp, back (wide integers)."""
    view = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[base.dtype]
    width = 32 if view == torch.int32 else 16
    bits = base.view(view).to(torch.int64)
    low = (1 << (width - 1)) - 1
    order = torch.where(bits < 0, -(bits & low), bits) + steps.to(torch.int64)
    order = order.clamp(-low, low)
    back = torch.where(order < 0, (-order) | -(1 << (width - 1)), order)
    return back.to(view).view(base.dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("special", [False, True], ids=["finite", "inf-nan"])
def test_step_decoding_matches_the_plain_arithmetic(dtype, special):
    """The vectorised step decoding (own-width integers for a finite base) gives the plain arithmetic's bits: across
    zero, subnormals, the largest value, and for bases holding Inf/NaN (the widened path)."""
    from peft_hft.format.encoding import _from_steps

    g = torch.Generator().manual_seed(1)
    base = torch.randn(3000, generator=g).to(dtype)
    tiny = torch.finfo(dtype).tiny
    edge = [0.0, -0.0, tiny / 4, -tiny / 4, torch.finfo(dtype).max, -torch.finfo(dtype).max]
    edge += [float("inf"), -float("inf"), float("nan")] if special else []
    base[: len(edge)] = torch.tensor(edge).to(dtype)
    steps = torch.randint(-127, 128, base.shape, generator=g).to(torch.int8)
    steps[: len(edge)] = torch.tensor([1, -1, -3, 3, 127, -127, 127, -127, 5][: len(edge)], dtype=torch.int8)
    assert bits_equal(_from_steps(base, steps, dtype, chunk=700), _reference_from_steps(base, steps))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_decoded_values_beyond_the_finite_range_are_refused_and_within_it_are_kept(dtype):
    """The decoder skips the scan of its result only where 127 steps cannot leave the finite range (a base within a
    quarter of the largest value): steps from the largest value to Inf are refused, as is an Inf exception, and a
    base at the quarter bound moved the full 127 steps up stays finite and exact."""
    encoding = parse_encoding("exact")
    top = torch.finfo(dtype).max

    def decode(base_value: float, step: int, exceptions: tuple[list[int], list[float]] = ([], [])):
        base = torch.full((64,), 0.5).to(dtype)
        base[3] = base_value
        steps = torch.zeros(64, dtype=torch.int8)
        steps[3] = step
        parts = {"": steps, "exc_idx": torch.tensor(exceptions[0], dtype=torch.int64),
                 "exc_val": torch.tensor(exceptions[1]).to(dtype)}
        return encoding.value(parts, (64,), base, dtype)

    with pytest.raises(EncodingError, match="finite range"):
        decode(top, 1)
    with pytest.raises(EncodingError, match="finite range"):
        decode(-top, -1)
    with pytest.raises(EncodingError, match="finite range"):
        decode(1.0, 0, ([5], [float("inf")]))
    quarter = torch.tensor(top / 4).to(dtype)
    moved = decode(float(quarter), 127)
    assert torch.isfinite(moved).all()
    expected = _reference_from_steps(quarter.reshape(1), torch.tensor([127], dtype=torch.int8))
    assert bits_equal(moved[3:4], expected)
