"""scale_adapter (peft-hft scale): base + alpha x diff, checked against hand computation in fp32 and bf16."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_models import tiny_model

import peft_hft
from peft_hft import HFTConfig, scale_adapter
from peft_hft.format.keys import parameter_name_of
from peft_hft.format.reader import AdapterFormatError


def _adapter(tmp_path, dtype=torch.float32, diff_dtype=None, diff_encoding="float"):
    model = tiny_model("llama", dtype=dtype)
    config = HFTConfig(seed=0, init_weights=False, diff_dtype=diff_dtype, diff_encoding=diff_encoding)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(tmp_path / "in")
    return tmp_path / "in"


def _diffs(directory):
    return {parameter_name_of(k): v for k, v in load_file(directory / "adapter_model.safetensors").items()}


def _weights(directory, dtype):
    loaded = PeftModel.from_pretrained(tiny_model("llama", dtype=dtype), directory)
    return {n.removeprefix("base_model.model."): p.detach().clone() for n, p in loaded.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("alpha", [0.75, 0.5, -1.0])
def test_scaled_model_is_base_plus_alpha_times_diff(tmp_path, dtype, alpha):
    source = _adapter(tmp_path, dtype)  # a bf16 model with fp32 master weights saves float32 diffs
    result = scale_adapter(source, tmp_path / "out", alpha, progress=False)
    diffs, scaled = _diffs(source), _diffs(tmp_path / "out")
    assert set(scaled) == set(diffs) and result.tensors == len(diffs)
    for name, diff in diffs.items():
        assert scaled[name].dtype == diff.dtype == torch.float32
        assert torch.equal(scaled[name], diff.float() * alpha)
    base = {n: p.detach() for n, p in tiny_model("llama", dtype=dtype).named_parameters()}
    got = _weights(tmp_path / "out", dtype)
    for name, value in base.items():
        expected = (value.float() + alpha * diffs[name].float()).to(dtype) if name in diffs else value
        assert torch.equal(got[name], expected), name
    # the same model add_weighted_adapter builds in memory, bit for bit
    loaded = PeftModel.from_pretrained(tiny_model("llama", dtype=dtype), source)
    loaded.add_weighted_adapter(["default"], [alpha], "dial")
    loaded.set_adapter("dial")
    for n, p in loaded.named_parameters():
        assert torch.equal(p, got[n.removeprefix("base_model.model.")]), n


def test_bf16_diffs_round_once_and_float32_output_keeps_the_product(tmp_path):
    source = _adapter(tmp_path, torch.bfloat16, diff_dtype="bfloat16")
    diffs = _diffs(source)
    assert {d.dtype for d in diffs.values()} == {torch.bfloat16}
    scale_adapter(source, tmp_path / "bf16", 0.75, progress=False)
    scale_adapter(source, tmp_path / "half", 0.5, progress=False)
    scale_adapter(source, tmp_path / "fp32", 0.75, diff_dtype="float32", progress=False)
    bf16, half, fp32 = (_diffs(tmp_path / n) for n in ("bf16", "half", "fp32"))
    rounded = 0
    for name, diff in diffs.items():
        exact = diff.float() * 0.75
        assert torch.equal(bf16[name], exact.to(torch.bfloat16))  # one rounding of the fp32 product
        assert ((bf16[name].float() - exact).abs() <= exact.abs() * 2**-8).all()
        rounded += int((bf16[name].float() != exact).sum())
        assert torch.equal(half[name].float(), diff.float() / 2)  # a power of two: exact in bf16
        assert fp32[name].dtype == torch.float32 and torch.equal(fp32[name], exact)
    assert rounded > 0, "0.75 x a bf16 value needs more mantissa bits than bf16 has for some entries"
    assert json.loads((tmp_path / "fp32" / "adapter_config.json").read_text())["diff_dtype"] == "float32"
    # the float32 output loads as the hand computation from the file's bf16 diffs, with the one rounding to bf16
    got = _weights(tmp_path / "fp32", torch.bfloat16)
    for name, value in tiny_model("llama", dtype=torch.bfloat16).named_parameters():
        expected = (value.float() + 0.75 * diffs[name].float()).to(torch.bfloat16) if name in diffs else value
        assert torch.equal(got[name], expected), name


def test_scaling_is_recorded_and_composes(tmp_path):
    source = _adapter(tmp_path)
    scale_adapter(source, tmp_path / "a", 0.5, progress=False)
    result = scale_adapter(tmp_path / "a", tmp_path / "b", 0.5, progress=False)
    config = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    original = json.loads((source / "adapter_config.json").read_text())
    assert result.total_alpha == 0.25 and config["scaling"]["alpha"] == 0.25
    assert [s["alpha"] for s in config["scaling"]["steps"]] == [0.5, 0.5]
    assert config["base_fingerprint"] == original["base_fingerprint"]
    assert config["selected_parameters"] == original["selected_parameters"]
    for name, diff in _diffs(source).items():
        assert torch.equal(_diffs(tmp_path / "b")[name], diff / 4)
    assert "peft-hft scale" in (tmp_path / "b" / "README.md").read_text()


def test_guards_refuse_before_writing(tmp_path):
    source = _adapter(tmp_path)
    with pytest.raises(ValueError, match="inside"):
        scale_adapter(source, source / "scaled", 0.5, progress=False)
    with pytest.raises(ValueError, match="is the"):
        scale_adapter(source, source, 0.5, overwrite=True, progress=False)
    with pytest.raises(ValueError, match="finite"):
        scale_adapter(source, tmp_path / "out", float("nan"), progress=False)
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError):
        scale_adapter(source, tmp_path / "exists", 0.5, progress=False)
    config = json.loads((source / "adapter_config.json").read_text())
    config["selected_parameters"] = config["selected_parameters"][1:]
    (source / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterFormatError, match="does not match"):  # the strict reader
        scale_adapter(source, tmp_path / "out", 0.5, progress=False)
    assert not (tmp_path / "out").exists() and not (source / "scaled").exists()
    assert peft_hft.scale_adapter is scale_adapter


def test_an_exact_encoded_adapter_is_scaled_against_its_base(tmp_path):
    """bf16 models save exact ulp steps by default: scale decodes them against the base (refused without it) and
    writes float32 diffs equal to alpha x (tuned - base), computed by hand."""
    source = _adapter(tmp_path, torch.bfloat16, diff_encoding=None)
    assert json.loads((source / "adapter_config.json").read_text())["diff_encoding"] == "exact"
    with pytest.raises(ValueError, match="needs the base"):
        scale_adapter(source, tmp_path / "out", 0.5, progress=False)
    assert not (tmp_path / "out").exists()
    base_dir = tmp_path / "base"
    tiny_model("llama", dtype=torch.bfloat16).save_pretrained(base_dir)
    scale_adapter(source, tmp_path / "out", 0.5, progress=False, base=base_dir)
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["diff_encoding"] == "float"
    tuned, base = _weights(source, torch.bfloat16), dict(tiny_model("llama", dtype=torch.bfloat16).named_parameters())
    scaled = _diffs(tmp_path / "out")
    assert scaled and all(v.dtype == torch.float32 for v in scaled.values())
    for name, diff in scaled.items():
        expected = 0.5 * (tuned[name].float() - base[name].detach().float())
        assert torch.equal(diff, expected), name
