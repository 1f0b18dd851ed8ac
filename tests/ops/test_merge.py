"""``peft-hft merge``: the streamed merge equals merge_and_unload + save, checks the base, and is atomic."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_models import batch, tiny_model, train_steps
from transformers import AutoModelForCausalLM

import peft_hft
from peft_hft.cli import main as cli
from peft_hft.format.checkpoint import SafetensorsWriter
from peft_hft.format.fingerprint import BaseMismatchError
from peft_hft.ops.merge import merge_checkpoint


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def make_pair(tmp_path: Path, tied: bool = False, shards: bool = True, dtype=torch.float32, seed: int = 0):
    """A base checkpoint on disk (sharded or not, with a tokenizer file) and an HFT adapter trained on it."""
    model = tiny_model("llama", layers=2, tie_word_embeddings=tied, dtype=dtype)
    base_dir = tmp_path / f"base-{tied}-{shards}"
    model.save_pretrained(base_dir, max_shard_size="20KB" if shards else "1GB")
    (base_dir / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    (base_dir / "README.md").write_text("the base model's card")
    peft_model = get_peft_model(model, peft_hft.HFTConfig(seed=seed))
    train_steps(peft_model, steps=2, lr=5e-2)
    adapter_dir = tmp_path / f"adapter-{tied}-{shards}"
    peft_model.save_pretrained(adapter_dir)
    return base_dir, adapter_dir


def reference_merge(base_dir: Path, adapter_dir: Path, dtype=None) -> dict[str, torch.Tensor]:
    """What users get in memory: from_pretrained (in the output dtype) + PeftModel + merge_and_unload."""
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype or "auto")
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def no_leftovers(parent: Path, name: str) -> bool:
    return not any(p.name.startswith(f".{name}.") for p in parent.iterdir()) and not (parent / name).exists()


@pytest.mark.parametrize("tied, shards", [(False, True), (True, True), (False, False)])
def test_streamed_merge_equals_merge_and_unload(tmp_path, tied, shards):
    base_dir, adapter_dir = make_pair(tmp_path, tied, shards)
    out = tmp_path / "merged"
    result = merge_checkpoint(base_dir, adapter_dir, out, progress=False)
    assert result.verified and result.shards == len(list(base_dir.glob("*.safetensors")))
    merged = load_dir(out)
    assert set(merged) == set(load_dir(base_dir))  # the checkpoint's own keys and sharding
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in base_dir.glob("*.safetensors"))
    reference = reference_merge(base_dir, adapter_dir)
    for key, tensor in merged.items():
        assert torch.equal(tensor, reference[key]), key
    assert (out / "tokenizer.json").read_text() == '{"fake": "tokenizer"}'
    assert json.loads((out / "config.json").read_text()) == json.loads((base_dir / "config.json").read_text())
    assert not (out / "README.md").exists()
    if shards:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert index["weight_map"] == json.loads((base_dir / "model.safetensors.index.json").read_text())["weight_map"]
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in merged.values())
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    expected = AutoModelForCausalLM.from_pretrained(base_dir)
    expected.load_state_dict(reference)
    with torch.no_grad():
        assert torch.equal(reloaded(**batch(0)).logits, expected(**batch(0)).logits)


def test_tied_checkpoint_storing_both_copies_gets_the_diff_in_both(tmp_path):
    base_dir, adapter_dir = make_pair(tmp_path, tied=True, shards=False)
    state = load_file(base_dir / "model.safetensors")
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, base_dir / "model.safetensors", metadata={"format": "pt"})
    merge_checkpoint(base_dir, adapter_dir, tmp_path / "out", progress=False)
    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(merged["lm_head.weight"], merged["model.embed_tokens.weight"])
    assert not torch.equal(merged["lm_head.weight"], state["lm_head.weight"])


def test_dtype_conversion_equals_loading_the_base_in_that_dtype(tmp_path):
    base_dir, adapter_dir = make_pair(tmp_path, shards=True)
    out = tmp_path / "bf16"
    merge_checkpoint(base_dir, adapter_dir, out, dtype="bfloat16", progress=False)
    merged = load_dir(out)
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    reference = reference_merge(base_dir, adapter_dir, dtype=torch.bfloat16)
    assert all(torch.equal(t, reference[k]) for k, t in merged.items())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_adapter_trained_in_bf16_merges_into_the_fp32_checkpoint(tmp_path):
    fp32 = tiny_model("llama", layers=2)
    fp32.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(tiny_model("llama", layers=2).to(torch.bfloat16), peft_hft.HFTConfig())
    train_steps(peft_model, steps=2, lr=5e-2)
    peft_model.save_pretrained(tmp_path / "adapter")
    merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", progress=False)
    merged = load_dir(tmp_path / "out")
    assert all(t.dtype == torch.float32 for t in merged.values())
    reference = reference_merge(tmp_path / "base", tmp_path / "adapter", dtype=torch.float32)
    assert all(torch.equal(t, reference[k]) for k, t in merged.items())


def test_wrong_base_is_refused_and_nothing_is_written(tmp_path):
    _, adapter_dir = make_pair(tmp_path)
    other = tmp_path / "other"
    tiny_model("llama", layers=2, seed=3).save_pretrained(other, max_shard_size="20KB")
    with pytest.raises(BaseMismatchError, match=r"of the \d+ base tensors it modifies differ in the base checkpoint"):
        merge_checkpoint(other, adapter_dir, tmp_path / "out", progress=False)
    assert no_leftovers(tmp_path, "out")
    result = merge_checkpoint(other, adapter_dir, tmp_path / "out", verify=False, progress=False)
    assert not result.verified and (tmp_path / "out" / "config.json").is_file()


def test_resized_vocabulary_is_refused_before_reading_any_tensor(tmp_path):
    _, adapter_dir = make_pair(tmp_path, shards=False)
    other = tiny_model("llama", layers=2)
    other.resize_token_embeddings(120)
    other.save_pretrained(tmp_path / "resized")
    with pytest.raises(BaseMismatchError, match=r"model\.embed_tokens\.weight: \(120, 32\) in the checkpoint vs"):
        merge_checkpoint(tmp_path / "resized", adapter_dir, tmp_path / "out", verify=False, progress=False)
    assert no_leftovers(tmp_path, "out")


def test_interrupted_merge_leaves_nothing(tmp_path, monkeypatch):
    base_dir, adapter_dir = make_pair(tmp_path)
    written = []
    original = SafetensorsWriter.write

    def write_then_interrupt(self, key, tensor):
        original(self, key, tensor)
        written.append(key)
        if len(written) == 8:  # in the middle of the shards
            raise KeyboardInterrupt

    monkeypatch.setattr(SafetensorsWriter, "write", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        merge_checkpoint(base_dir, adapter_dir, tmp_path / "out", progress=False)
    assert len(written) == 8 and no_leftovers(tmp_path, "out")


def test_sigterm_during_a_merge_leaves_nothing(tmp_path):
    base_dir, adapter_dir = make_pair(tmp_path)
    script = textwrap.dedent(
        f"""
        import sys, time
        from peft_hft.cli import main as cli
        from peft_hft.format.checkpoint import SafetensorsWriter
        original = SafetensorsWriter.write
        def slow_write(self, key, tensor):
            original(self, key, tensor)
            print("wrote", key, flush=True)
            time.sleep(0.5)
        SafetensorsWriter.write = slow_write
        sys.exit(cli.main(["merge", {str(base_dir)!r}, {str(adapter_dir)!r}, {str(tmp_path / "out")!r}, "--quiet"]))
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("wrote")  # the merge is under way, a shard half written
    assert any(p.name.startswith(".out.peft-hft-tmp-") for p in tmp_path.iterdir())
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted; no output was written" in stderr
    assert no_leftovers(tmp_path, "out")


def test_temporaries_of_a_killed_merge_are_removed_by_the_next_one(tmp_path):
    base_dir, adapter_dir = make_pair(tmp_path)
    stale = tmp_path / ".out.peft-hft-tmp-999999999-abc"  # no such process
    stale.mkdir()
    (stale / "model-00001-of-00007.safetensors").write_bytes(b"half")
    merge_checkpoint(base_dir, adapter_dir, tmp_path / "out", progress=False)
    assert not stale.exists() and (tmp_path / "out").is_dir()


def test_cli_merge(tmp_path, capsys):
    base_dir, adapter_dir = make_pair(tmp_path)
    out = tmp_path / "out"
    assert cli.main(["merge", str(base_dir), str(adapter_dir), str(out), "--quiet"]) == 0
    assert "base verified against the adapter's fingerprint" in capsys.readouterr().out
    assert cli.main(["merge", str(base_dir), str(adapter_dir), str(out), "--quiet"]) == 1
    assert "already exists. Fix: choose another output path, or pass --overwrite" in capsys.readouterr().err
    before = (out / "config.json").stat().st_ino
    assert cli.main(["merge", str(base_dir), str(adapter_dir), str(out), "--quiet", "--overwrite"]) == 0
    assert (out / "config.json").stat().st_ino != before
    assert cli.main(["merge", str(base_dir), str(tmp_path / "nowhere"), str(tmp_path / "x"), "--quiet"]) == 1
    assert "neither a local directory nor a Hugging Face Hub repo id" in capsys.readouterr().err


def test_lora_adapter_is_refused_with_a_pointer_to_peft(tmp_path):
    from peft import LoraConfig

    base_dir, _ = make_pair(tmp_path)
    lora = get_peft_model(tiny_model("llama", layers=2), LoraConfig(target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match="is a LORA adapter, not an HFT adapter"):
        merge_checkpoint(base_dir, tmp_path / "lora", tmp_path / "out", progress=False)


def test_console_script_is_installed():
    from importlib.metadata import entry_points

    (entry,) = [e for e in entry_points(group="console_scripts") if e.name == "peft-hft"]
    assert entry.value == "peft_hft.cli.main:main" and entry.load() is cli.main
    assert (Path(sys.executable).parent / "peft-hft").is_file()
    parser = cli.build_parser()
    assert {"merge", "inspect", "diff"} <= set(parser._subparsers._group_actions[0].choices)


MEMORY_SCRIPT = """
import sys
from peft_hft.ops.merge import merge_checkpoint

def status(key):  # kB
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))

tiny_base, tiny_adapter, base, adapter, out = sys.argv[1:]
merge_checkpoint(tiny_base, tiny_adapter, out + "-warmup", progress=False)  # imports and first-use allocations
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
before = status("VmRSS")
merge_checkpoint(base, adapter, out, progress=False)
print(before * 1024, status("VmHWM") * 1024)
"""


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's resettable peak RSS")
@pytest.mark.parametrize("encoding, dtype", [("float", torch.float32), ("int4", torch.float32),
                                             ("exact", torch.bfloat16), ("float", torch.bfloat16)], ids=["float", "int4", "exact-bf16", "float-bf16"])
def test_peak_memory_is_bounded_by_the_largest_shard_not_the_model(tmp_path, encoding, dtype):
    """A 69 MB model in 8 MB shards: the merge's peak RSS grows by about a shard, not by the model's size, with every
    kind of encoding (decoded one tensor at a time against the streamed base tensor)."""
    model = tiny_model(
        "llama", layers=6, hidden_size=384, intermediate_size=1536, num_attention_heads=6, num_key_value_heads=6,
        vocab_size=4096, dtype=dtype,
    )
    model.save_pretrained(tmp_path / "base", max_shard_size="8MB" if dtype == torch.float32 else "4MB")
    get_peft_model(model, peft_hft.HFTConfig(init_weights=False)).save_pretrained(
        tmp_path / "adapter", diff_encoding=encoding)
    del model
    # the warm-up merge (imports, first-use allocations) runs the same encoding and dtype on a tiny model
    tiny_base, tiny_adapter = tmp_path / "tiny-base", tmp_path / "tiny-adapter"
    tiny = tiny_model("llama", layers=1, dtype=dtype)
    tiny.save_pretrained(tiny_base)
    get_peft_model(tiny, peft_hft.HFTConfig(init_weights=False)).save_pretrained(tiny_adapter, diff_encoding=encoding)
    from peft_hft.format.checkpoint import Checkpoint

    checkpoint = Checkpoint.open(tmp_path / "base")
    total, largest = checkpoint.total_bytes, checkpoint.largest_shard_bytes()
    assert total > (60e6 if dtype == torch.float32 else 30e6) and largest < 8.5e6
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(tiny_base), str(tiny_adapter), str(tmp_path / "base"),
         str(tmp_path / "adapter"), str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert out.returncode == 0, out.stderr
    before, peak = map(int, out.stdout.split())
    growth = peak - before
    print(f"{encoding}: model {total / 1e6:.0f} MB, largest shard {largest / 1e6:.1f} MB, peak RSS growth "
          f"{growth / 1e6:.1f} MB")
    largest_tensor = max(e.nbytes // e.dtype.itemsize for e in checkpoint.entries.values()) * 4  # as float32
    if encoding == "float" and dtype == torch.float32:
        assert 0 < growth < 2 * largest < total / 4
    else:  # decoding works on float32/int32 copies of one tensor at a time: a few times the largest tensor
        assert 0 < growth < 5 * largest_tensor < total
