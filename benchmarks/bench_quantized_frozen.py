"""What training against an NF4 frozen half costs in quality, when the adapter is applied to the full-precision base.

Two runs on SmolLM2-135M-Instruct in bf16, the same HFT selection (``HFTConfig(seed=0)``, fp32 masters), AdamW, the
same batches of real text (llamafactory's Alpaca demo, packed; ``bench_precision.packed_text``):

* ``full``: the default, every frozen tensor in bf16;
* ``nf4``: ``quantize_frozen(model)`` after ``get_peft_model``: the frozen block matrices in NF4 (torchao).

Each adapter is saved and loaded onto a fresh full-precision base (``PeftModel.from_pretrained``, base fingerprint
checked), and the held-out loss (the last tenth of the text) of that model is compared: base, ``full``, ``nf4`` applied
to the full-precision base, and ``nf4`` as trained (frozen half still NF4). The cosine between the two saved updates
says whether the trained half learned the same thing.

Usage::

    python benchmarks/bench_quantized_frozen.py               # CPU: 40 steps, batch 2 x 128, lr 2e-5

Writes ``quantized-frozen-<device>.json`` into ``--output``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_precision import compare, held_out_loss, packed_text  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-sequences", type=int, default=16)
    p.add_argument("--output", default=str(REPO / "benchmarks" / "results"))
    return p.parse_args(argv)


def full_precision_model(args):
    from peft_hft.resources.default_model import load_default_model

    model, _ = load_default_model(dtype=torch.bfloat16, device=args.device)
    model.config.use_cache = False
    return model


def train(name: str, args, train_rows, eval_rows, quantize: bool, directory: Path) -> dict:
    from peft import PeftModel, get_peft_model

    from peft_hft import HFTConfig, quantize_frozen
    from peft_hft.tuner.layer import find_ledger

    peft_model = get_peft_model(full_precision_model(args), HFTConfig(seed=0))
    quantized = quantize_frozen(peft_model) if quantize else []
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=args.lr)
    peft_model.train()
    train_loss = []
    for step in tqdm(range(args.steps), desc=name):
        start = (step * args.batch_size) % (len(train_rows) - args.batch_size)
        ids = train_rows[start: start + args.batch_size].to(args.device)
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_loss.append(loss.float().item())
    as_trained = held_out_loss(peft_model, eval_rows, args.device)
    diffs = find_ledger(peft_model).diffs("default", torch.float32)
    peft_model.save_pretrained(directory / name)
    del peft_model, optimizer
    on_full = PeftModel.from_pretrained(full_precision_model(args), directory / name)  # checks the base fingerprint
    return {
        "quantized_tensors": len(quantized),
        "train_loss_last10": sum(train_loss[-10:]) / len(train_loss[-10:]),
        "held_out_loss_as_trained": as_trained,
        "held_out_loss_on_full_precision_base": held_out_loss(on_full, eval_rows, args.device),
        "diffs": diffs,
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    from peft_hft.resources.default_model import load_default_model

    _, tokenizer = load_default_model()
    train_rows, eval_rows = packed_text(tokenizer, args.seq_len)
    eval_rows = eval_rows[: args.eval_sequences]
    base_loss = held_out_loss(full_precision_model(args), eval_rows, args.device)
    with tempfile.TemporaryDirectory() as tmp:
        runs = {name: train(name, args, train_rows, eval_rows, name == "nf4", Path(tmp)) for name in ("full", "nf4")}
    agreement = compare(runs["nf4"].pop("diffs"), runs["full"].pop("diffs"))
    result = {
        "machine": {"device": platform.processor() or platform.machine(), "torch": torch.__version__},
        "args": vars(args),
        "held_out_loss_base": base_loss,
        "runs": runs,
        "nf4_vs_full_update": {k.replace("fp32", "full"): v for k, v in agreement.items()},
    }
    print(json.dumps(result, indent=2))
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"quantized-frozen-{'cuda' if args.device.startswith('cuda') else 'cpu'}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
