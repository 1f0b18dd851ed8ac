"""Sharing HFT adapters through the Hub: push_to_hub with an HFT model card, and an upload -> download round trip.

huggingface_hub runs its real client code down to the HTTP request layer; the Hub is the in-memory ``FakeHub``
(tests/fake_hub.py). The download lands in a real Hub cache directory, and a fresh process then loads from that
cache with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import huggingface_hub
import pytest
import torch
import yaml
from fake_hub import FakeHub
from huggingface_hub import HfApi, constants
from huggingface_hub.utils import _http
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model
from tiny_models import batch, tiny_model, train_steps
from transformers import AutoModelForCausalLM

import peft_hft
from peft_hft.format.fingerprint import BaseMismatchError

BASE_REPO = "user/tiny-llama"
ADAPTER_REPO = "user/hft-adapter"


def logits(model):
    with torch.no_grad():
        return model(**batch(0)).logits


def card_of(data: bytes) -> tuple[dict, str]:
    text = data.decode()
    _, front, body = text.split("---", 2)
    return yaml.safe_load(front), body


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A FakeHub behind huggingface_hub's client, online mode, and a fresh Hub cache in tmp_path/hf/hub."""
    fake = FakeHub()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # PEFT reads the variable itself
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token")
    # Xet uploads bypass the HTTP client (native hf_xet); the LFS "basic" transfer goes through it.
    monkeypatch.setattr(huggingface_hub._commit_api, "is_xet_available", lambda: False)
    huggingface_hub.set_client_factory(fake.client)
    huggingface_hub.close_session()
    yield fake
    huggingface_hub.set_client_factory(_http.default_client_factory)
    huggingface_hub.close_session()


@pytest.fixture
def published(hub):
    """A base pushed to the Hub, loaded back from it, trained with HFT and pushed as an adapter."""
    tiny_model("llama", layers=2).push_to_hub(BASE_REPO)
    base = AutoModelForCausalLM.from_pretrained(BASE_REPO)
    assert base.name_or_path == BASE_REPO
    model = get_peft_model(base, peft_hft.HFTConfig(seed=0, task_type="CAUSAL_LM"))
    train_steps(model, steps=3)
    info = model.push_to_hub(ADAPTER_REPO, tags=["demo"])
    return model, info


def test_push_to_hub_uploads_the_adapter_and_an_hft_model_card(hub, published, tmp_path):
    model, info = published
    commit = hub.last_commit(ADAPTER_REPO)
    assert info.oid == commit.sha and commit.summary == "Upload HFT adapter"
    assert [(op["key"], op["path"]) for op in commit.operations] == [
        ("file", "README.md"),
        ("file", "adapter_config.json"),
        ("lfsFile", "adapter_model.safetensors"),  # through the LFS batch API and an upload PUT
    ]
    uploaded = {op["path"]: op["bytes"] for op in commit.operations}
    model.save_pretrained(tmp_path / "local")
    assert uploaded["adapter_model.safetensors"] == (tmp_path / "local" / "adapter_model.safetensors").read_bytes()

    metadata, text = card_of(uploaded["README.md"])
    assert metadata["library_name"] == "peft"
    assert metadata["base_model"] == BASE_REPO
    assert {"hft", "peft-hft", "demo", f"base_model:adapter:{BASE_REPO}"} <= set(metadata["tags"])
    assert metadata["pipeline_tag"] == "text-generation"
    assert "import peft_hft" in text
    assert text.index("import peft_hft") < text.index(f'PeftModel.from_pretrained(base, "{ADAPTER_REPO}")')
    assert f'AutoPeftModelForCausalLM.from_pretrained("{ADAPTER_REPO}")' in text
    assert f"peft-hft merge {BASE_REPO} {ADAPTER_REPO} merged-model/" in text

    config = json.loads(uploaded["adapter_config.json"])
    assert config["peft_type"] == "HFT" and config["base_model_name_or_path"] == BASE_REPO
    fingerprint = config["base_fingerprint"]
    assert fingerprint["base_model"] == BASE_REPO
    assert fingerprint["revision"] == hub.repos[BASE_REPO].branches["main"]  # the commit the base came from


def test_upload_download_round_trip_offline(hub, published, tmp_path):
    model, _ = published
    expected = logits(model)
    # Download through the real client into the Hub cache (online, from the FakeHub) ...
    fresh = AutoModelForCausalLM.from_pretrained(BASE_REPO)
    loaded = PeftModel.from_pretrained(fresh, ADAPTER_REPO)
    assert (logits(loaded) - expected).abs().max() <= 1e-5
    cache = tmp_path / "hf" / "hub"
    assert (cache / "models--user--hft-adapter" / "refs" / "main").is_file()
    torch.save(expected, tmp_path / "expected.pt")

    # ... then a fresh process loads everything from that cache with HF_HUB_OFFLINE=1 (any request would raise).
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
        import peft_hft
        from peft import AutoPeftModelForCausalLM, PeftModel
        from transformers import AutoModelForCausalLM
        from tiny_models import batch
        from peft_hft.ops.merge import merge_checkpoint

        expected = torch.load({str(tmp_path / "expected.pt")!r})
        def check(model, what):
            with torch.no_grad():
                diff = (model(**batch(0)).logits - expected).abs().max().item()
            print(what, diff)
            assert diff <= 1e-5, (what, diff)

        base = AutoModelForCausalLM.from_pretrained({BASE_REPO!r})
        check(PeftModel.from_pretrained(base, {ADAPTER_REPO!r}), "PeftModel")
        check(AutoPeftModelForCausalLM.from_pretrained({ADAPTER_REPO!r}), "AutoPeftModel")
        merge_checkpoint({BASE_REPO!r}, {ADAPTER_REPO!r}, {str(tmp_path / "merged")!r}, progress=False)
        check(AutoModelForCausalLM.from_pretrained({str(tmp_path / "merged")!r}), "peft-hft merge")
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "hf"))
    env.pop("HF_TOKEN", None)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert [line.split()[0] for line in out.stdout.splitlines()] == ["PeftModel", "AutoPeftModel", "peft-hft"]


def test_a_new_revision_of_the_base_is_refused(hub, published):
    tiny_model("llama", layers=2, seed=7).push_to_hub(BASE_REPO)  # the base repo moves on
    with pytest.raises(BaseMismatchError, match=rf"made for '{BASE_REPO}' at revision [0-9a-f]{{40}}"):
        AutoPeftModelForCausalLM.from_pretrained(ADAPTER_REPO)


def test_pushing_again_keeps_the_card_text_written_on_the_hub(hub, published):
    model, _ = published
    metadata, text = card_of(hub.files(ADAPTER_REPO)["README.md"])
    front = yaml.safe_dump({**metadata, "license": "apache-2.0"})
    edited = f"---\n{front}---\n{text}\n## My notes\n\nKeep me.\n"
    HfApi().upload_file(path_or_fileobj=edited.encode(), path_in_repo="README.md", repo_id=ADAPTER_REPO)
    model.push_to_hub(ADAPTER_REPO)
    metadata, text = card_of(hub.files(ADAPTER_REPO)["README.md"])
    assert metadata["license"] == "apache-2.0" and "hft" in metadata["tags"]
    assert "## My notes\n\nKeep me." in text
    assert text.count("<!-- peft-hft:start -->") == 1 and text.count("## HFT adapter") == 1


def test_push_to_a_branch(hub, published):
    model, _ = published
    model.push_to_hub(ADAPTER_REPO, revision="v2", commit_message="second stage")
    assert hub.last_commit(ADAPTER_REPO).summary == "second stage"
    assert set(hub.files(ADAPTER_REPO, "v2")) >= {"README.md", "adapter_config.json", "adapter_model.safetensors"}


def test_other_peft_methods_keep_the_original_push_to_hub(hub):
    lora = get_peft_model(tiny_model("llama", layers=2), LoraConfig(target_modules=["q_proj"]))
    lora.push_to_hub("user/lora")
    files = hub.files("user/lora")
    assert json.loads(files["adapter_config.json"])["peft_type"] == "LORA"
    metadata, text = card_of(files["README.md"])
    assert "hft" not in (metadata.get("tags") or []) and "peft-hft" not in text


def test_an_encoded_adapter_round_trips_through_the_hub(hub, published, tmp_path):
    """push_to_hub(..., diff_encoding="int4") uploads the encoded adapter; PeftModel and peft-hft merge read it back
    from the Hub with the weights of a local load of the same files, and the card gives its real size."""
    model, _ = published
    model.push_to_hub("user/hft-adapter-int4", diff_encoding="int4")
    uploaded = {op["path"]: op["bytes"] for op in hub.last_commit("user/hft-adapter-int4").operations}
    assert json.loads(uploaded["adapter_config.json"])["diff_encoding"] == "int4"
    model.save_pretrained(tmp_path / "local", diff_encoding="int4")
    assert uploaded["adapter_model.safetensors"] == (tmp_path / "local" / "adapter_model.safetensors").read_bytes()
    local = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE_REPO), tmp_path / "local")
    remote = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE_REPO), "user/hft-adapter-int4")
    assert torch.equal(logits(local), logits(remote))
    assert not torch.equal(logits(remote), logits(AutoModelForCausalLM.from_pretrained(BASE_REPO)))
    _, text = card_of(uploaded["README.md"])
    from peft_hft.format.checkpoint import read_header

    size = sum(e.nbytes for e in read_header(tmp_path / "local" / "adapter_model.safetensors")[0].values())
    assert f"{size / 1e6:,.1f} MB of diffs" in text
