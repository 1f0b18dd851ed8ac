"""Cost of peft_hft.RetentionCallback on SmolLM2-135M-Instruct: reference, memory and time per evaluation, measured
side by side with the training steps it watches, and the gap between the top-K KL and the exact KL.

    python benchmarks/bench_retention.py                      # CPU, fp32, HFT on 8 alpaca batches
    python benchmarks/bench_retention.py --precision bf16 --steps 20

Prints the figures and writes benchmarks/results/retention.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from contextlib import nullcontext
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from peft import get_peft_model  # noqa: E402

import peft_hft  # noqa: E402
from peft_hft.integrations.retention import RetentionProbe, default_texts  # noqa: E402
from peft_hft.resources.data import alpaca_demo  # noqa: E402
from peft_hft.resources.default_model import load_default_model  # noqa: E402


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--texts", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "retention.json")
    args = parser.parse_args()

    model, tokenizer = load_default_model()
    model = get_peft_model(model, peft_hft.HFTConfig(seed=0))
    cast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.precision == "bf16" else nullcontext
    texts = default_texts(args.texts)
    probes = {k: RetentionProbe(tokenizer, texts, args.max_length, 8, top_k=k) for k in (256, None)}
    figures: dict = {"tokens": probes[256].tokens, "vocab": len(tokenizer), "texts": args.texts,
                     "max_length": args.max_length, "precision": args.precision,
                     "torch_threads": torch.get_num_threads()}
    for k, probe in probes.items():
        before = rss_mib()
        start = time.perf_counter()
        probe.reference(model, cast())
        figures[f"reference_seconds_top{k}"] = time.perf_counter() - start
        figures[f"reference_bytes_top{k}"] = probe.reference_bytes
        figures[f"peak_rss_growth_mib_top{k}"] = rss_mib() - before

    rows = alpaca_demo()[: args.steps * 4]
    texts_train = [f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in rows]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    step_seconds = []
    model.train()
    for step in range(args.steps):
        batch = tokenizer(texts_train[step * 4:(step + 1) * 4], return_tensors="pt", padding=True, truncation=True,
                          max_length=256)
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        start = time.perf_counter()
        with cast():
            loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        step_seconds.append(time.perf_counter() - start)
    figures["train_step_seconds"] = sum(step_seconds[1:]) / max(1, len(step_seconds) - 1)
    for k, probe in probes.items():
        start = time.perf_counter()
        metrics = probe.measure(model, cast())
        figures[f"measure_seconds_top{k}"] = time.perf_counter() - start
        figures[f"kl_top{k}"] = metrics.kl_to_base
        figures["ppl_increase_pct"] = metrics.ppl_increase_pct
    figures["measure_over_train_step"] = figures["measure_seconds_top256"] / figures["train_step_seconds"]
    figures["kl_gap_relative"] = 1 - figures["kl_top256"] / figures["kl_topNone"]
    for key, value in figures.items():
        print(f"{key:32s} {value:.6g}" if isinstance(value, float) else f"{key:32s} {value}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
