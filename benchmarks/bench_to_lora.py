"""What an HFT adapter keeps when converted to LoRA (``peft_hft.ops.to_lora``), by rank, on SmolLM2-135M-Instruct.

Trains a short HFT adapter on the sarcasm task (the forgetting benchmark's new task, ``peft_hft.bench.newtask``),
converts it to LoRA at each rank, loads each LoRA with plain ``PeftModel.from_pretrained`` and reports, side by side
with the HFT adapter itself and the base model:

* new-task accuracy on held-out test examples: lm-eval's multiple-choice accuracy (the answer whose tokens have the
  highest summed log-probability), computed here directly because lm-eval's ``hf`` model calls ``tie_weights()``,
  which fails on a LoRA of SmolLM2's tied embedding (a PEFT/transformers limitation, see docs/integrations.md);
* logit error against the HFT model on held-out prompts: mean and max absolute difference, mean KL(HFT || LoRA),
  next-token top-1 agreement;
* the conversion's relative Frobenius error of the diffs and the LoRA size.

    python benchmarks/bench_to_lora.py --output outputs/to_lora            # ~10 minutes on 2 CPU cores
    python benchmarks/bench_to_lora.py --steps 10 --test-size 40 --ranks 16  # a smoke run

Writes ``results.json`` and ``to_lora.png`` into ``--output``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model

from peft_hft import HFTConfig
from peft_hft.bench.newtask import load_new_task, training_batches
from peft_hft.bench.train import train
from peft_hft.ops.to_lora import save_as_lora
from peft_hft.resources.default_model import load_default_model


def logit_errors(reference: list[torch.Tensor], model, inputs: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Mean/max |logit difference|, mean KL(reference || model) and top-1 agreement over the real tokens."""
    abs_sum = count = kl_sum = agree = 0.0
    worst = 0.0
    with torch.no_grad():
        for ref, batch in zip(reference, inputs, strict=True):
            got = model(**batch).logits.float()
            mask = batch["attention_mask"].bool()
            diff = (got - ref).abs()[mask]
            abs_sum += float(diff.sum())
            worst = max(worst, float(diff.max()))
            count += diff.numel()
            log_p, log_q = ref.log_softmax(-1)[mask], got.log_softmax(-1)[mask]
            kl_sum += float((log_p.exp() * (log_p - log_q)).sum())
            agree += float((ref.argmax(-1)[mask] == got.argmax(-1)[mask]).sum())
    tokens = count / reference[0].shape[-1]
    return {"mean_abs": abs_sum / count, "max_abs": worst, "kl": kl_sum / tokens, "top1_agreement": agree / tokens}


def choice_accuracy(model, tokenizer, task, batch_size: int = 16) -> float:
    """Share of test examples whose gold answer has the highest summed log-probability among the task's labels."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pairs = []
    for example in task.test:
        prompt = tokenizer(example.prompt, add_special_tokens=False).input_ids
        for label in task.labels:
            pairs.append((prompt, tokenizer(task.target_delimiter + label, add_special_tokens=False).input_ids))
    scores = []
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            width = max(len(p) + len(a) for p, a in chunk)
            ids = torch.tensor([p + a + [pad] * (width - len(p) - len(a)) for p, a in chunk])
            mask = torch.tensor([[1] * (len(p) + len(a)) + [0] * (width - len(p) - len(a)) for p, a in chunk])
            logp = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
            for row, (p, a) in enumerate(chunk):
                positions = torch.arange(len(p) - 1, len(p) + len(a) - 1)
                scores.append(float(logp[row, positions, torch.tensor(a)].sum()))
    per_example = torch.tensor(scores).view(len(task.test), len(task.labels))
    gold = torch.tensor([task.labels.index(ex.answer) for ex in task.test])
    return float((per_example.argmax(-1) == gold).float().mean())


def prompt_batches(task, tokenizer, n: int, batch_size: int = 8) -> list[dict[str, torch.Tensor]]:
    texts = [ex.prompt + task.target_delimiter + ex.answer for ex in task.test[:n]]
    return [tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True)
            for i in range(0, len(texts), batch_size)]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["lora"] if r["embeddings"] == "lora"]
    ranks = [r["rank"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(ranks, [r["accuracy"] for r in rows], "o-", label="LoRA from HFT")
    left.axhline(results["hft"]["accuracy"], color="C1", linestyle="--", label="HFT adapter")
    left.axhline(results["base"]["accuracy"], color="gray", linestyle=":", label="base model")
    left.set(xscale="log", xlabel="LoRA rank", ylabel="sarcasm test accuracy", title="New-task score")
    left.legend()
    right.plot(ranks, [r["logits"]["mean_abs"] for r in rows], "o-", label="mean |logit diff| vs HFT")
    right.plot(ranks, [r["diff_relative_error"] for r in rows], "s-", label="relative error of the diffs")
    right.set(xscale="log", yscale="log", xlabel="LoRA rank", title="Approximation error")
    right.legend()
    fig.suptitle("HFT -> LoRA on SmolLM2-135M-Instruct")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="outputs/to_lora")
    parser.add_argument("--ranks", default="16,64,256")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--test-size", type=int, default=200)
    parser.add_argument("--logit-prompts", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    model, tokenizer = load_default_model()
    task = load_new_task("sarcasm", tokenizer, validation_size=10, test_size=args.test_size, prompt="compact")
    results: dict = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "test_size": args.test_size}
    model.eval()
    results["base"] = {"accuracy": choice_accuracy(model, tokenizer, task)}

    peft_model = get_peft_model(model, HFTConfig(seed=args.seed, task_type="CAUSAL_LM"))
    batches = training_batches(task, tokenizer, args.batch_size, args.steps, args.seed, "full", 96)
    log = train(peft_model, batches, lr=args.lr, desc="HFT training")
    peft_model.eval()
    results["hft"] = {"accuracy": choice_accuracy(peft_model, tokenizer, task),
                      "train_seconds": log["seconds"], "final_loss": log["loss"][-1],
                      "parameters": sum(p.numel() for n, p in peft_model.named_parameters()
                                        if n.removeprefix("base_model.model.")
                                        in peft_model.peft_config["default"].selected_parameters)}
    inputs = prompt_batches(task, tokenizer, args.logit_prompts)
    with torch.no_grad():
        reference = [peft_model(**b).logits.float() for b in inputs]
    print(f"base acc {results['base']['accuracy']:.3f}  HFT acc {results['hft']['accuracy']:.3f}", flush=True)

    results["lora"] = []
    with tempfile.TemporaryDirectory() as tmp:
        variants = [(int(r), "lora") for r in args.ranks.split(",")] + [(int(args.ranks.split(",")[-1]), "drop")]
        for rank, embeddings in variants:
            start = time.perf_counter()
            name = f"r{rank}-{embeddings}"
            report = save_as_lora(Path(tmp) / name, peft_model, rank, progressbar=True, embeddings=embeddings)
            seconds = time.perf_counter() - start
            base, _ = load_default_model()
            lora = PeftModel.from_pretrained(base, Path(tmp) / name).eval()
            row = {
                "rank": rank,
                "embeddings": embeddings,
                "convert_seconds": seconds,
                "lora_parameters": report.lora_parameters(),
                "diff_relative_error": report.relative_error,
                "accuracy": choice_accuracy(lora, tokenizer, task),
                "logits": logit_errors(reference, lora, inputs),
                "adapter_bytes": (Path(tmp) / name / "adapter_model.safetensors").stat().st_size,
            }
            results["lora"].append(row)
            print(json.dumps(row), flush=True)
            del lora, base
    (output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, output / "to_lora.png")
    print(f"wrote {output / 'results.json'} and {output / 'to_lora.png'}")


if __name__ == "__main__":
    main()
