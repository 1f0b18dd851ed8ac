"""The shared helpers: statistics behind every benchmark report, and the precision policy every run uses."""

from __future__ import annotations

import math

import pytest
import torch

from peft_hft.utils import mean_interval, mean_std, t95


def test_t95_is_students_quantile_with_the_next_smaller_tabulated_df():
    assert t95(2) == 4.303 and t95(12) == t95(10) == 2.228 and t95(100) == 1.96
    assert math.isnan(t95(0))


def test_mean_interval_is_the_t_interval_of_the_mean():
    stat = mean_interval([1.0, 2.0, 6.0])
    assert stat["mean"] == pytest.approx(3.0) and stat["n"] == 3 and stat["values"] == [1.0, 2.0, 6.0]
    std = math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2)
    assert stat["std"] == pytest.approx(std)
    half = 4.303 * std / math.sqrt(3)
    assert stat["ci95"] == pytest.approx([3.0 - half, 3.0 + half])


def test_a_single_value_has_no_interval_and_no_values_no_mean():
    assert mean_interval([2.5]) == {"mean": 2.5, "std": 0.0, "n": 1, "values": [2.5], "ci95": None}
    assert mean_std([]) == {"mean": None, "std": None, "n": 0, "values": []}


# ------------------------------------------------------------------------------------------- precision policy


def _machine(monkeypatch, *, cuda: bool = False, cuda_bf16: bool = False, cpu: str = "emulated") -> None:
    import peft_hft.utils as utils

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
    monkeypatch.setattr(utils, "cpu_bf16_support", lambda: cpu)


@pytest.mark.parametrize(
    "machine, device, expected, says",
    [
        (dict(cuda=True, cuda_bf16=True), None, "bf16", "this GPU has native bf16"),
        (dict(cuda=True, cuda_bf16=False), None, "fp32", "this GPU has no native bf16"),
        (dict(cuda=True, cuda_bf16=True, cpu="emulated"), "cpu", "fp32", "this CPU has no native bf16"),
        (dict(cpu="amx"), None, "bf16", "this CPU has native bf16 (AMX)"),
        (dict(cpu="native"), None, "bf16", "this CPU has native bf16 (autocast"),
        # bf16 instructions without matrix units: measured slower than fp32, so auto keeps fp32
        (dict(cpu="avx512_bf16"), None, "fp32", "AVX512-BF16) but no AMX: bf16 autocast measured 1.2-1.6x slower"),
        (dict(cpu="emulated"), None, "fp32", "this CPU has no native bf16; --precision bf16 forces it"),
    ],
)
def test_auto_takes_bf16_only_where_the_hardware_has_it(monkeypatch, machine, device, expected, says):
    from peft_hft.utils import resolve_precision

    _machine(monkeypatch, **machine)
    choice = resolve_precision("auto", device)
    assert choice.precision == expected and choice.requested == "auto"
    assert str(choice).startswith(f"precision {expected}: ") and says in str(choice)


def test_an_explicit_precision_is_honoured_and_slow_bf16_warns_with_its_cost(monkeypatch):
    import warnings

    from peft_hft.utils import resolve_precision

    _machine(monkeypatch, cpu="emulated")
    with pytest.warns(UserWarning, match=r"no native bf16.*7-28x slower than fp32"):
        choice = resolve_precision("bf16")
    assert choice.precision == "bf16" and "--precision auto picks fp32" in choice.reason
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision("fp32").precision == "fp32"
        _machine(monkeypatch, cpu="amx")
        assert resolve_precision("bf16").precision == "bf16"  # native: no warning
        _machine(monkeypatch, cpu="avx512_bf16")  # native but slower than fp32: honoured, said, no warning
        choice = resolve_precision("bf16")
        assert choice.precision == "bf16" and "measured 1.2-1.6x slower" in choice.reason
        assert "--precision auto picks fp32 here" in choice.reason
    with pytest.raises(ValueError, match="Unknown precision 'fp16'"):
        resolve_precision("fp16")


@pytest.mark.parametrize("arch, flags, oneDNN, expected", [
    ("x86_64", {"avx512_bf16": True, "amx": False}, True, "avx512_bf16"),
    ("x86_64", {"avx512_bf16": True, "amx": True}, True, "amx"),
    ("x86_64", {"avx512_bf16": False, "amx": True}, True, "amx"),
    ("x86_64", {"avx512_bf16": False, "amx": False}, True, "emulated"),  # AVX-512 without BF16: oneDNN says yes
    ("aarch64", {"avx512_bf16": False, "amx": False}, True, "native"),
    ("aarch64", {"avx512_bf16": False, "amx": False}, False, "emulated"),
])
def test_cpu_bf16_probe(monkeypatch, arch, flags, oneDNN, expected):
    import platform

    from peft_hft.utils import cpu_bf16_support

    monkeypatch.setattr(platform, "machine", lambda: arch)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: flags["avx512_bf16"], raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: flags["amx"], raising=False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: oneDNN, raising=False)
    assert cpu_bf16_support() == expected


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_autocast_runs_the_resolved_precision(precision, dtype):
    from peft_hft.utils import autocast

    layer = torch.nn.Linear(4, 4)
    with autocast(precision, "cpu"):
        assert layer(torch.randn(2, 4)).dtype == dtype
    with pytest.raises(ValueError, match="resolve 'auto'"):
        autocast("auto", "cpu")
