"""Adapter format on a real model: sizes, bf16-diff error, streamed vs in-memory merge, fingerprint cost.

On SmolLM2-135M-Instruct (the embedded default model, fp32, tied embeddings): a short HFT fine-tune on Alpaca demo
data, saved as an fp32 adapter and as a bf16-diff adapter; ``peft-hft merge`` from the cached base checkpoint (and
from a copy re-saved in 100 MB shards) compared with ``PeftModel.from_pretrained(...).merge_and_unload()`` +
``save_pretrained``: identical tensors, wall time, peak RSS. Each merge runs in its own process; its peak RSS is read
from ``/proc/self/status`` (VmHWM) after resetting the mark once the imports are done, so "growth" is what the merge
itself needed.

    python benchmarks/bench_adapter_format.py            # results in $OUT or outputs/bench_adapter_format/

Stages are cached in the output directory (delete it to start over). Writes results.json and adapter_format.png.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

OUT = Path(os.environ.get("OUT") or "outputs/bench_adapter_format")
STEPS = int(os.environ.get("BENCH_STEPS", "20"))
BATCH, MAX_LEN, LR = 4, 128, 1e-4

MERGE_PROCESS = r"""
import json, sys, time
mode, base, adapter, out = sys.argv[1:]

def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key + ":"))

import torch, peft_hft
from peft import PeftModel
from transformers import AutoModelForCausalLM
from peft_hft.ops.merge import merge_checkpoint
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
start_rss, start = status("VmRSS"), time.perf_counter()
if mode == "stream":
    merge_checkpoint(base, adapter, out, progress=False)
else:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)
print(json.dumps({"seconds": time.perf_counter() - start, "rss_after_imports": start_rss, "peak_rss": status("VmHWM")}))
"""


def prompt(row: dict) -> str:
    return f"### Instruction:\n{row['instruction']}\n{row.get('input', '')}\n### Response:\n{row['output']}"


def batches(tokenizer, rows, seed):
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(rows), generator=g).tolist()
    for i in range(0, len(order) - BATCH + 1, BATCH):
        texts = [prompt(rows[j]) for j in order[i:i + BATCH]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=MAX_LEN)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        yield {**enc, "labels": labels}


def train(results: dict) -> None:
    """Short HFT fine-tune; saves the fp32 and bf16-diff adapters and the tuned weights' eval outputs."""
    from peft import get_peft_model

    import peft_hft
    from peft_hft.resources.data import alpaca_demo
    from peft_hft.resources.default_model import load_default_model

    model, tokenizer = load_default_model()
    rows = alpaca_demo()
    train_rows, eval_rows = rows[:800], rows[900:]
    peft_model = get_peft_model(model, peft_hft.HFTConfig(seed=0, task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=LR)
    peft_model.train()
    start = time.perf_counter()
    for step, inputs in enumerate(batches(tokenizer, train_rows, seed=0)):
        if step == STEPS:
            break
        loss = peft_model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"step {step + 1}/{STEPS} loss {loss.item():.3f}", flush=True)
    results["train"] = {"steps": STEPS, "batch": BATCH, "max_len": MAX_LEN, "lr": LR,
                        "seconds": time.perf_counter() - start}
    peft_model.eval()
    eval_batch = next(batches(tokenizer, eval_rows, seed=1))
    with torch.no_grad():
        out = peft_model(**eval_batch)
    torch.save({"batch": eval_batch, "logits": out.logits, "loss": out.loss.item()}, OUT / "eval.pt")
    t = time.perf_counter()
    peft_model.save_pretrained(OUT / "adapter-fp32")
    first_save = time.perf_counter() - t
    t = time.perf_counter()
    peft_model.save_pretrained(OUT / "adapter-fp32")
    second_save = time.perf_counter() - t
    peft_model.peft_config["default"].diff_dtype = "bfloat16"
    peft_model.save_pretrained(OUT / "adapter-bf16")
    results["save_seconds"] = {"first (fingerprint computed)": first_save, "second (fingerprint cached)": second_save}
    tuned = peft_model.get_base_model().state_dict()
    names = peft_model.peft_config["default"].selected_parameters
    torch.save({n: tuned[n].clone() for n in names}, OUT / "tuned_selected.pt")


def bf16_error(results: dict) -> None:
    from peft import PeftModel

    import peft_hft  # noqa: F401
    from peft_hft.resources.default_model import load_default_model

    tuned = torch.load(OUT / "tuned_selected.pt")
    evaluation = torch.load(OUT / "eval.pt")
    report = {}
    for variant in ("fp32", "bf16"):
        model, _ = load_default_model()
        loaded = PeftModel.from_pretrained(model, OUT / f"adapter-{variant}")
        state = loaded.get_base_model().state_dict()
        errors = torch.cat([(state[n] - tuned[n]).abs().flatten() for n in tuned])
        diffs = torch.cat([(tuned[n] - loaded.base_model.ledger.original(n)).abs().flatten() for n in tuned])
        with torch.no_grad():
            out = loaded(**evaluation["batch"])
        report[variant] = {
            "max_abs_weight_error": errors.max().item(),
            "mean_abs_weight_error": errors.mean().item(),
            "mean_abs_diff (tuned - base)": diffs.mean().item(),
            "max_abs_logit_diff": (out.logits - evaluation["logits"]).abs().max().item(),
            "eval_loss": out.loss.item(),
            "eval_loss_tuned": evaluation["loss"],
        }
        del loaded, model
    results["bf16_diffs"] = report


def load_times(results: dict) -> None:
    """PeftModel.from_pretrained of the fp32 adapter with and without the base check (best of 3, base preloaded)."""
    import contextlib

    from peft import PeftModel

    import peft_hft
    from peft_hft.resources.default_model import load_default_model

    times = {}
    for label, context in (("with base check", contextlib.nullcontext), ("check skipped", peft_hft.skip_base_check)):
        best = float("inf")
        for _ in range(3):
            model, _ = load_default_model()
            with context():
                start = time.perf_counter()
                PeftModel.from_pretrained(model, OUT / "adapter-fp32")
                best = min(best, time.perf_counter() - start)
            del model
        times[label] = best
    results["load_seconds (best of 3)"] = times


def merges(results: dict, base_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    sharded = OUT / "base-sharded-100MB"
    if not sharded.exists():
        AutoModelForCausalLM.from_pretrained(base_dir).save_pretrained(sharded, max_shard_size="100MB")
    runs = {}
    for name, mode, base in (("streamed", "stream", base_dir), ("streamed, 100 MB shards", "stream", sharded),
                             ("in memory (merge_and_unload)", "memory", base_dir)):
        out = OUT / ("merged-" + name.split()[0] + ("-sharded" if "shards" in name else ""))
        if out.exists():
            import shutil

            shutil.rmtree(out)
        proc = subprocess.run([sys.executable, "-c", MERGE_PROCESS, mode, str(base), str(OUT / "adapter-fp32"),
                               str(out)], capture_output=True, text=True, check=True)
        runs[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        runs[name]["output"] = str(out)
        print(name, runs[name], flush=True)
    from peft_hft.format.checkpoint import Checkpoint

    base_ckpt, sharded_ckpt = Checkpoint.open(base_dir), Checkpoint.open(sharded)
    runs["streamed"]["largest_shard_bytes"] = base_ckpt.largest_shard_bytes()
    runs["streamed, 100 MB shards"]["largest_shard_bytes"] = sharded_ckpt.largest_shard_bytes()
    runs["largest_tensor_bytes"] = max(e.nbytes for e in base_ckpt.entries.values())
    streamed = Checkpoint.open(runs["streamed"]["output"])
    reference = Checkpoint.open(runs["in memory (merge_and_unload)"]["output"])
    identical = sum(torch.equal(streamed.read(k), reference.read(k)) for k in reference.entries)
    same_keys = set(streamed.entries) == set(reference.entries)
    runs["identical_tensors"] = f"{identical} of {len(reference.entries)} (keys equal: {same_keys})"
    results["merge"] = runs


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    sizes = results["sizes_mb"]
    left.bar([k.replace(" (", "\n(") for k in sizes], list(sizes.values()), color=["#999999", "#1f77b4", "#ff7f0e"])
    for i, v in enumerate(sizes.values()):
        left.text(i, v, f"{v:,.0f} MB", ha="center", va="bottom", fontsize=8)
    left.set_ylabel("MB on disk")
    left.set_ylim(0, 1.15 * max(sizes.values()))
    left.set_title("SmolLM2-135M: full model vs HFT adapter")
    merge = {k: v for k, v in results["merge"].items() if isinstance(v, dict)}
    growth = [(v["peak_rss"] - v["rss_after_imports"]) / 1e6 for v in merge.values()]
    right.bar(range(len(merge)), growth, color=["#1f77b4", "#2ca02c", "#d62728"])
    right.set_xticks(range(len(merge)))
    right.set_xticklabels([k.replace(", ", "\n").replace(" (", "\n(") for k in merge], fontsize=8)
    right.set_ylim(0, 1.2 * max(growth))
    for i, (g, v) in enumerate(zip(growth, merge.values(), strict=True)):
        right.text(i, g, f"{g:,.0f} MB\n{v['seconds']:.1f} s", ha="center", va="bottom", fontsize=8)
    right.set_ylabel("peak RSS growth during the merge (MB)")
    right.set_title("merging the adapter into the base")
    fig.tight_layout()
    fig.savefig(OUT / "adapter_format.png")
    plt.close(fig)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results["machine"] = f"{os.cpu_count()}-core CPU, torch {torch.__version__}"
    results["date"] = time.strftime("%Y-%m-%d")
    from peft_hft.resources.default_model import default_model_path

    base_dir = default_model_path()
    if not (OUT / "adapter-bf16" / "adapter_model.safetensors").exists():
        train(results)
        path.write_text(json.dumps(results, indent=2))
    if "bf16_diffs" not in results:
        bf16_error(results)
        path.write_text(json.dumps(results, indent=2))
    if "load_seconds (best of 3)" not in results:
        load_times(results)
        path.write_text(json.dumps(results, indent=2))
    if "merge" not in results:
        merges(results, base_dir)
        path.write_text(json.dumps(results, indent=2))
    from peft_hft.ops.inspect import format_info, inspect_adapter

    info32 = inspect_adapter(OUT / "adapter-fp32", base=base_dir)
    info16 = inspect_adapter(OUT / "adapter-bf16", base=base_dir)
    results["inspect"] = format_info(info32).splitlines()[:8]
    results["sizes_mb"] = {
        "full model": info32.base_bytes / 1e6,
        "HFT adapter (fp32 diffs)": info32.file_bytes / 1e6,
        "HFT adapter (bf16 diffs)": info16.file_bytes / 1e6,
    }
    results["size_ratio"] = {
        "fp32": info32.tensor_bytes / info32.base_bytes, "bf16": info16.tensor_bytes / info16.base_bytes
    }
    path.write_text(json.dumps(results, indent=2))
    plot(results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
