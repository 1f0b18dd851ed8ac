"""Measured error of the adapter encodings (docs/adapter-format.md, "Encodings: measured error").

SmolLM2-135M-Instruct in **bf16** (weights bf16, fp32 master values), HFT (ratio 0.5) trained with the forgetting
benchmark's completion setting (sarcasm, compact prompts, 100 AdamW steps of 8, lr 3e-4, loss on the answer only,
warm-up 10% then linear decay), one run per seed. Each seed's adapter is saved once with ``diff_encoding="float"``
(fp32 diffs that carry the masters: the uncompressed reference), then re-encoded with ``peft_hft.ops.compress`` into
every encoding, and each encoded adapter is loaded onto the bf16 base and scored: new-task test accuracy and Wikipedia
perplexity (the forgetting benchmark's sets, lm-eval's metrics from the packed scorers), the mean per-token KL
divergence to the uncompressed adapter on held-out text, bytes on disk, load time and ``peft-hft merge`` time.

    python benchmarks/bench_adapter_encodings.py train   # trains and saves the reference adapters (cached)
    python benchmarks/bench_adapter_encodings.py eval    # encodes, scores, writes results.json
    python benchmarks/bench_adapter_encodings.py report  # the markdown table and adapter_encodings.png

The load time against the floor (``safetensors.torch.load_file`` + copy) is ``benchmarks/bench_load_time.py``'s.

Results go to $OUT (default outputs/bench_adapter_encodings/); SEEDS (default "0,1,2") picks the seeds.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

OUT = Path(os.environ.get("OUT") or "outputs/bench_adapter_encodings")
SEEDS = [int(s) for s in os.environ.get("SEEDS", "0,1,2").split(",")]
LR = 3e-4
ENCODINGS = ["float", "exact", "int4", "int8", "dare:0.9", "sign", "dare:0.99"]


def protocol():
    from peft_hft.bench.protocol import Protocol

    return Protocol(methods=["hft"], seeds=[0, 1, 2], loss="completion", full_lr_grid=[LR], retention=["wikipedia"],
                    retention_limits={"wikipedia": 150})


def bench():
    from peft_hft.bench.runner import prepare

    b = prepare(protocol(), OUT / "bench", device="cpu")
    b.base_model.to(torch.bfloat16)
    return b


def train_phase() -> None:
    from peft_hft.bench.newtask import training_batches
    from peft_hft.bench.train import train

    b = bench()
    method = b.methods[0]
    p = b.protocol
    for seed in SEEDS:
        target = OUT / f"seed{seed}" / "float"
        if (target / "adapter_config.json").is_file():
            continue
        torch.manual_seed(seed)
        model = method.wrap(copy.deepcopy(b.base_model), seed)
        model.peft_config["default"].diff_encoding = "float"
        batches = training_batches(b.task, b.tokenizer, p.batch_size, p.steps, seed, p.loss, p.max_length)
        record = train(model, batches, LR, warmup=p.warmup, precision="bf16", desc=f"hft seed {seed}")
        model.save_pretrained(target)
        (OUT / f"seed{seed}" / "train.json").write_text(json.dumps(record) + "\n")
        print(f"seed {seed}: trained in {record['seconds']:.0f} s, final loss {record['loss'][-1]:.3f}", flush=True)


def held_out_batches(b, rows: int = 16, length: int = 128) -> list[dict[str, torch.Tensor]]:
    """Wikipedia passages that are not among the perplexity set's scored rows: the text for the KL divergence."""
    from peft_hft.bench.tasks import wikipedia_rows

    scored = {r.get("text") for spec in b.specs for r in spec.rows}
    texts = [r["text"] for r in wikipedia_rows() if r["text"] not in scored][:rows]
    out = []
    for i in range(0, len(texts), 8):
        enc = b.tokenizer(texts[i:i + 8], return_tensors="pt", padding=True, truncation=True, max_length=length)
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


@torch.no_grad()
def log_probs(model, batches) -> list[torch.Tensor]:
    return [torch.log_softmax(model(**batch).logits.float(), dim=-1) for batch in batches]


def mean_kl(reference: list[torch.Tensor], other: list[torch.Tensor], batches) -> float:
    """Mean over real tokens of KL(reference || other)."""
    total, count = 0.0, 0
    for p, q, batch in zip(reference, other, batches, strict=True):
        kl = (p.exp() * (p - q)).sum(-1)
        mask = batch["attention_mask"].bool()
        total += float(kl[mask].sum())
        count += int(mask.sum())
    return total / count


def eval_phase() -> None:
    from peft import PeftModel

    from peft_hft.bench.evaluate import evaluate
    from peft_hft.format.reader import read_adapter
    from peft_hft.ops.compress import compress_adapter
    from peft_hft.ops.merge import merge_checkpoint
    from peft_hft.resources.default_model import default_model_path

    deadline_file = OUT / "deadline"  # a Unix time after which no new row is started (keeps a shared run short)
    deadline = float(deadline_file.read_text()) if deadline_file.is_file() else float("inf")
    b = bench()
    base_dir = default_model_path()
    base_bytes = sum(p.numel() * p.element_size() for p in b.base_model.parameters())  # the bf16 model
    specs = [b.specs[1], *b.specs[2:]]  # test split and Wikipedia
    batches = held_out_batches(b)
    results_path = OUT / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for seed in SEEDS:
        reference_dir = OUT / f"seed{seed}" / "float"
        if not (reference_dir / "adapter_config.json").is_file():
            continue
        reference_model = PeftModel.from_pretrained(copy.deepcopy(b.base_model), reference_dir)
        reference = log_probs(reference_model, batches)
        reference_weights = {k: v.clone() for k, v in reference_model.get_base_model().state_dict().items()}
        del reference_model
        for spec in ENCODINGS:
            key = f"{seed}/{spec}"
            if key in results:
                continue
            if time.time() > deadline:
                print(f"deadline reached: {key} and later rows not run", flush=True)
                return
            directory = reference_dir if spec == "float" else OUT / f"seed{seed}" / spec.replace(":", "_")
            if spec != "float" and not directory.is_dir():
                compress_adapter(reference_dir, directory, spec, base=base_dir, progress=False)
            adapter = read_adapter(directory, load=False)
            stored = adapter.stored_bytes()
            trained = sum(int(torch.Size(adapter.shape_of(n)).numel()) for n in adapter.diffs)
            adapter.close()
            start = time.perf_counter()
            model = PeftModel.from_pretrained(copy.deepcopy(b.base_model), directory)
            load_seconds = time.perf_counter() - start
            weights = model.get_base_model().state_dict()
            identical = all(torch.equal(weights[k], v) for k, v in reference_weights.items())
            row = {"seed": seed, "encoding": spec, "bytes": (directory / "adapter_model.safetensors").stat().st_size,
                   "tensor_bytes": stored, "trained_parameters": trained, "base_bytes": base_bytes,
                   "load_seconds": load_seconds, "weights_identical_to_float": identical}
            if identical and f"{seed}/float" in results:  # the same bf16 weights: the same scores, no need to re-run
                previous = results[f"{seed}/float"]
                row.update(scores=previous["scores"], kl=0.0, scores_copied_from="float")
            else:
                row["kl"] = mean_kl(reference, log_probs(model, batches), batches)
                row["scores"] = evaluate(model, b.tokenizer, specs, b.protocol.eval_batch_size, "bf16", packed=True)
            del model
            merged = OUT / "merged"
            start = time.perf_counter()
            merge_checkpoint(base_dir, directory, merged, dtype="bfloat16", overwrite=True, progress=False)
            row["merge_seconds"] = time.perf_counter() - start
            results[key] = row
            results_path.write_text(json.dumps(results, indent=1) + "\n")
            print(json.dumps({k: v for k, v in row.items()}), flush=True)


def steps_phase() -> None:
    """The distribution of the exact update in bf16 ulp steps, per seed (what the "exact" encoding stores)."""
    from peft_hft.format.encoding import _steps_of  # noqa: PLC2701 - the measurement is of that very function
    from peft_hft.format.reader import read_adapter
    from peft_hft.resources.default_model import load_default_model

    base, _ = load_default_model()
    base.to(torch.bfloat16)
    out = {}
    edges = [0, 1, 2, 4, 8, 16, 32, 64, 127, 128, 1024, 2**15]
    for seed in SEEDS:
        directory = OUT / f"seed{seed}" / "float"
        if not (directory / "adapter_config.json").is_file():
            continue
        counts = torch.zeros(len(edges), dtype=torch.int64)
        total = 0
        with read_adapter(directory, load=False) as adapter:
            for name in adapter.diffs:
                b = base.get_parameter(name).detach()
                tuned = (b.float() + adapter.diff(name).float()).to(torch.bfloat16)
                steps = _steps_of(b, tuned).abs().reshape(-1)
                total += steps.numel()
                for k, edge in enumerate(edges):
                    counts[k] += int((steps <= edge).sum())
        shares = {str(e): int(c) / total for e, c in zip(edges, counts, strict=True)}
        out[seed] = {"elements": total, "share_at_most": shares}
        print(json.dumps({seed: out[seed]}), flush=True)
    (OUT / "steps.json").write_text(json.dumps(out, indent=1) + "\n")


def report_phase() -> None:
    """The table (markdown, to stdout) and the size/quality PNG from results.json (whatever rows finished)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = json.loads((OUT / "results.json").read_text()) if (OUT / "results.json").is_file() else {}
    by_encoding: dict[str, list[dict]] = {}
    for row in results.values():
        by_encoding.setdefault(row["encoding"], []).append(row)
    lines = ["| encoding | seeds | bytes on disk | share of the bf16 base | bytes per trained parameter "
             "| new-task acc (pts vs float; seeds' range) | Wikipedia ppl (% vs float; range) | mean token KL to float "
             "| load (s) | merge (s) |",
             "|" + "---|" * 10]
    points = []
    for spec in ENCODINGS:
        rows = by_encoding.get(spec, [])
        if not rows:
            continue
        def mean(values):
            return sum(values) / len(values)
        acc, ppl = [], []
        for row in rows:
            ref = results.get(f"{row['seed']}/float")
            if ref is None:
                continue
            test_key = next(k for k in row["scores"] if k.endswith("_test"))
            acc.append(100 * (row["scores"][test_key]["acc"] - ref["scores"][test_key]["acc"]))
            wiki, wiki_ref = row["scores"]["wikipedia"], ref["scores"]["wikipedia"]
            metric = next(k for k in ("word_perplexity", "perplexity") if k in wiki)
            ppl.append(100 * (wiki[metric] / wiki_ref[metric] - 1))
        share = mean([r["bytes"] / r["base_bytes"] for r in rows])
        lines.append(
            f"| `{spec}` | {','.join(str(r['seed']) for r in rows)} | {mean([r['bytes'] for r in rows]) / 1e6:.1f} MB "
            f"| {100 * share:.1f}% | {mean([r['tensor_bytes'] / r['trained_parameters'] for r in rows]):.3f} "
            f"| {mean(acc):+.1f} ({min(acc):+.1f} to {max(acc):+.1f}) | {mean(ppl):+.2f} ({min(ppl):+.1f} to "
            f"{max(ppl):+.1f}) | {mean([r['kl'] for r in rows]):.2e} "
            f"| {mean([r['load_seconds'] for r in rows]):.1f} | {mean([r['merge_seconds'] for r in rows]):.1f} |"
        )
        points.append((spec, share, mean([r["kl"] for r in rows]), mean(ppl) if ppl else float("nan"),
                       mean(acc) if acc else float("nan")))
    print("\n".join(lines))
    if points:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        for spec, share, kl, ppl, acc in points:
            for ax, value in zip(axes, (max(kl, 1e-7), ppl, acc), strict=True):
                ax.scatter(100 * share, value)
                ax.annotate(spec, (100 * share, value), textcoords="offset points", xytext=(4, 4))
        axes[0].set_yscale("log")
        axes[0].set_ylabel("mean token KL to the float adapter (1e-7 = identical)")
        axes[1].set_ylabel("Wikipedia perplexity vs the float adapter (%)")
        axes[2].set_ylabel("new-task accuracy vs the float adapter (points)")
        for ax, band in zip(axes, (None, 2.0, 1.0), strict=True):
            ax.axvline(12.5, color="grey", linestyle="--", linewidth=0.8)  # 1/8 of the base model's bytes
            if band is not None:
                ax.axhspan(-band, band, color="green", alpha=0.08)  # the quality bounds the encodings aim for
            ax.set_xlabel("adapter bytes on disk, % of the bf16 base model (dashed: 1/8)")
            ax.grid(alpha=0.3)
        fig.suptitle("HFT adapter encodings, SmolLM2-135M-Instruct (bf16), completion SFT on sarcasm")
        fig.tight_layout()
        fig.savefig(OUT / "encodings.png", dpi=120)


if __name__ == "__main__":
    phase = sys.argv[1] if len(sys.argv) > 1 else "train"
    if phase == "train":
        train_phase()
    elif phase == "steps":
        steps_phase()
    elif phase == "report":
        report_phase()
    else:
        eval_phase()
