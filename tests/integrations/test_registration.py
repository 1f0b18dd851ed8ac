"""HFT is a registered PEFT method: importing peft_hft is enough, and doing it twice is harmless."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from peft import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import peft_hft
from peft_hft import HFTConfig, HFTModel


def test_peft_type_member_behaves_like_a_real_enum_member():
    assert PeftType.HFT.value == "HFT"
    assert PeftType("HFT") is PeftType.HFT and PeftType["HFT"] is PeftType.HFT
    assert PeftType.HFT in list(PeftType)
    assert pickle.loads(pickle.dumps(PeftType.HFT)) is PeftType.HFT
    assert HFTConfig().peft_type is PeftType.HFT


def test_peft_mappings_point_at_hft():
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.HFT] is HFTConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.HFT] is HFTModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.HFT] == "hft_" == HFTModel.prefix
    # the string form in adapter_config.json resolves too
    assert PEFT_TYPE_TO_CONFIG_MAPPING["HFT"] is HFTConfig


def test_registration_is_idempotent_and_survives_reload():
    peft_hft.register()
    peft_hft.integrations.registration.hft_peft_type()
    assert list(PeftType).count(PeftType.HFT) == 1
    # reloading creates new class objects; run it in a fresh interpreter so this session keeps its classes
    script = textwrap.dedent(
        """
        import importlib, peft_hft
        from peft import get_peft_model
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
        from peft.utils import PeftType
        from transformers import LlamaConfig, LlamaForCausalLM
        importlib.reload(peft_hft.tuner.config)
        importlib.reload(peft_hft)
        assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.HFT] is peft_hft.HFTConfig
        assert list(PeftType).count(PeftType.HFT) == 1
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=64)
        model = get_peft_model(LlamaForCausalLM(cfg), peft_hft.HFTConfig())
        print("OK", model.peft_type.value)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("OK HFT")


def test_config_file_says_hft(tmp_path):
    HFTConfig(seed=3).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "HFT" and data["seed"] == 3
    assert isinstance(PeftConfig.from_pretrained(tmp_path), HFTConfig)


def _declared_requirements() -> dict[str, Requirement]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    return {Requirement(d).name.lower(): Requirement(d) for d in deps}


@pytest.mark.parametrize("package", ["peft", "transformers", "trl", "torch", "accelerate", "huggingface_hub"])
def test_installed_versions_are_in_the_declared_range(package):
    requirement = _declared_requirements()[package.lower()]
    installed = importlib.metadata.version(package).split("+")[0]
    assert requirement.specifier.contains(installed, prereleases=True), (package, installed, str(requirement))


def test_readme_states_the_tested_floors():
    """README's "Supported versions" names the floors `make test-compat` tests (tests/lowest_versions.py)."""
    from lowest_versions import lowest_versions

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Supported versions", 1)[1].split("\n## ", 1)[0]
    floors = lowest_versions()
    assert set(floors) == {"peft", "transformers", "trl"}
    for name, version in floors.items():
        assert f"{name} {version}" in section, (name, version)
    declared = _declared_requirements()
    for name, version in floors.items():
        assert declared[name].specifier.contains(version) and f">={version}" in str(declared[name].specifier)


def test_lowest_versions_reads_each_floor():
    from lowest_versions import lowest_versions

    text = '"peft>=0.21.0",\n"transformers>=5.0.0,<5.24",\n"trl>=1.0.0",'
    assert lowest_versions(text) == {"peft": "0.21.0", "transformers": "5.0.0", "trl": "1.0.0"}
    with pytest.raises(SystemExit, match="trl"):
        lowest_versions('"peft>=0.21.0", "transformers>=5.0.0"')
