"""Does HFT learn on a bf16 model? Loss curves of HFT-bf16 with each ``HFTConfig(master_weights=...)`` option (fp32
masters; Kahan-compensated bf16, the default; Kahan in 1 byte; stochastic rounding; none) vs HFT-fp32, on
SmolLM2-135M-Instruct at a full-rank fine-tuning learning rate. With ``--speed``: what bf16 autocast costs or saves
on this machine, fp32 vs bf16 autocast side by side.

Every run trains the same HFT selection (``HFTConfig(seed=0)``) with AdamW on the same batches of real text
(llamafactory's Alpaca demo, packed), and evaluates the loss on the same held-out sequences (the last tenth of the
text) every ``--eval-every`` steps. It also compares what each bf16 run learned with the fp32 run: the share of
trained elements whose saved diff is non-zero, the norm of the diffs relative to fp32, and their cosine with the fp32
run's diffs (the float32 diffs, read from the ledger). ``--runs`` picks a subset (comma-separated keys of ``RUNS``).

``--speed`` times, interleaved in one process, an HFT training step (ratio 0.5, AdamW; 8 x 96 tokens) and a forward
pass (16 x 128 tokens) of the fp32 model without autocast and under bf16 autocast (fp32 weights, as the package's
``--precision bf16`` runs), and prints the bf16 / fp32 ratios next to what ``--precision auto`` picks here. On a CPU
without native bf16 the ratios are 28x (step) and 7x (forward); with native bf16 they are below 1.

Usage::

    python benchmarks/bench_precision.py                          # CPU: 40 steps, batch 2 x 128, lr 1e-5
    python benchmarks/bench_precision.py --device cuda --steps 300 --batch-size 8 --seq-len 512
    python benchmarks/bench_precision.py --speed                  # fp32 vs bf16 autocast step and forward times

Writes ``precision-quality-<device>.json`` and ``.png`` (``--speed``: ``precision-speed-<device>``) into ``--output``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]
RUNS = {  # name -> (model dtype, HFTConfig.master_weights)
    "HFT-fp32": ("float32", "fp32"),
    "HFT-bf16, master_weights=fp32": ("bfloat16", "fp32"),
    "HFT-bf16, master_weights=kahan (default)": ("bfloat16", "kahan"),
    "HFT-bf16, master_weights=kahan8": ("bfloat16", "kahan8"),
    "HFT-bf16, master_weights=stochastic_rounding": ("bfloat16", "stochastic_rounding"),
    "HFT-bf16, master_weights=none": ("bfloat16", "none"),
    # peft_hft.low_memory_preset(): stochastic rounding, torchao AdamW4bit, the step fused into backward in slices,
    # each tensor's gradient clipped at 1.0
    "HFT-bf16, low-memory preset": ("bfloat16", "preset"),
    # peft_hft.low_memory_preset(8): the same with torchao AdamW8bit (separates what the 4-bit moments cost)
    "HFT-bf16, low-memory preset at 8 bits": ("bfloat16", "preset8"),
}
SHORT = dict(zip(("fp32", "bf16-fp32", "kahan", "kahan8", "stochastic_rounding", "none", "preset", "preset8"), RUNS,
                 strict=True))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-sequences", type=int, default=8)
    p.add_argument("--runs", default=",".join(SHORT),
                   help=f"comma-separated runs out of {','.join(SHORT)} (fp32, the reference, always runs)")
    p.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"],
                   help="tiny: a random 2-layer Llama (hidden 64, SmolLM2's tokenizer), for a quick check")
    p.add_argument("--eager-optimizer", action="store_true",
                   help="run torchao's optimizer step eagerly (torch.compiler.set_stance('force_eager')): no compile")
    p.add_argument("--output", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--speed", action="store_true", help="time fp32 vs bf16 autocast (step and forward) instead")
    p.add_argument("--repeats", type=int, default=3, help="--speed: timed rounds per precision (after one warm-up)")
    return p.parse_args(argv)


def packed_text(tokenizer, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) token sequences of length ``seq_len``: the first nine tenths of the text, and the rest."""
    from peft_hft.resources.data import alpaca_demo

    text = "\n\n".join(f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in alpaca_demo())
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    rows = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)
    split = int(len(rows) * 0.9)
    return rows[:split], rows[split:]


def held_out_loss(model, rows: torch.Tensor, device: str) -> float:
    model.eval()
    with torch.no_grad():
        losses = [model(input_ids=r[None].to(device), labels=r[None].to(device)).loss.float().item() for r in rows]
    model.train()
    return sum(losses) / len(losses)


def tiny_llama(vocab_size: int):
    """A 2-layer Llama with hidden size 64 and untied embeddings, the same random weights every time (rounded to bf16
    by the caller, so fp32 and bf16 runs start from the same values)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def run(name: str, args, train_rows: torch.Tensor, eval_rows: torch.Tensor) -> dict:
    from peft import get_peft_model

    from peft_hft import HFTConfig, memory_report
    from peft_hft.resources.default_model import load_default_model
    from peft_hft.tuner.layer import find_ledger

    dtype, masters = RUNS[name]
    if args.model == "tiny":
        model = tiny_llama(len(load_default_model()[1])).to(torch.bfloat16).to(getattr(torch, dtype)).to(args.device)
    else:
        model, _ = load_default_model(dtype=getattr(torch, dtype), device=args.device)
    model.config.use_cache = False
    if masters in ("preset", "preset8"):
        from peft_hft import apply_low_memory_preset, low_memory_config

        bits = 8 if masters == "preset8" else 4
        peft_model = get_peft_model(model, low_memory_config(bits, seed=0))
        optimizer = apply_low_memory_preset(peft_model, bits, lr=args.lr)
    else:
        peft_model = get_peft_model(model, HFTConfig(seed=0, master_weights=masters))
        optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=args.lr)
    curve = {0: held_out_loss(peft_model, eval_rows, args.device)}
    train_loss = []
    peft_model.train()
    for step in tqdm(range(1, args.steps + 1), desc=name):
        start = ((step - 1) * args.batch_size) % (len(train_rows) - args.batch_size)
        ids = train_rows[start : start + args.batch_size].to(args.device)
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_loss.append(loss.float().item())
        if step % args.eval_every == 0 or step == args.steps:
            curve[step] = held_out_loss(peft_model, eval_rows, args.device)
    ledger = find_ledger(peft_model)
    diffs = ledger.diffs("default", torch.float32)
    return {
        "model_dtype": dtype,
        "master_weights": masters,
        "held_out_loss": curve,
        "train_loss": train_loss,
        "master_bytes": memory_report(peft_model)["master_bytes"],
        "diffs": diffs,
    }


def compare(diffs: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, float]:
    changed = sum(int((d != 0).sum()) for d in diffs.values())
    changed_ref = sum(int((d != 0).sum()) for d in reference.values())
    norm = torch.sqrt(sum((d.double() ** 2).sum() for d in diffs.values())).item()
    norm_ref = torch.sqrt(sum((d.double() ** 2).sum() for d in reference.values())).item()
    flat = torch.cat([d.flatten() for d in diffs.values()]).double()
    flat_ref = torch.cat([reference[n].flatten() for n in diffs]).double()
    return {
        "changed_share_vs_fp32": changed / max(changed_ref, 1),
        "diff_norm_vs_fp32": norm / max(norm_ref, 1e-30),
        "cosine_with_fp32_diff": torch.nn.functional.cosine_similarity(flat, flat_ref, dim=0).item(),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    for name, r in result["runs"].items():
        steps = [int(s) for s in r["held_out_loss"]]
        axes[0].plot(steps, list(r["held_out_loss"].values()), marker="o", label=name)
        windows = [r["train_loss"][max(0, i - 4) : i + 1] for i in range(len(r["train_loss"]))]
        smooth = [sum(w) / len(w) for w in windows]
        axes[1].plot(range(1, len(smooth) + 1), smooth, label=name)
    axes[0].set(title="held-out loss", xlabel="step", ylabel="loss")
    axes[1].set(title="training loss (moving average of 5)", xlabel="step")
    axes[0].legend(fontsize=8)
    a = result["args"]
    title = "tiny Llama (random)" if a.get("model") == "tiny" else "SmolLM2-135M-Instruct"
    fig.suptitle(f"{title}, HFT, AdamW lr {a['lr']}, batch {a['batch_size']} x {a['seq_len']}, "
                 f"{a['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


SPEED_SHAPES = {"train step": (8, 96), "forward": (16, 128)}  # (sequences, tokens): the shapes of docs/benchmarks.md


def _timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def speed(args) -> dict:
    """Median seconds of an HFT training step and of a forward pass in fp32 and under bf16 autocast, interleaved
    round by round (fp32, bf16, fp32, ...) so that a busy machine slows both alike."""
    from peft import get_peft_model

    from peft_hft import HFTConfig
    from peft_hft.resources.default_model import load_default_model
    from peft_hft.utils import autocast, resolve_precision

    choice = resolve_precision("auto", args.device)
    model, tokenizer = load_default_model(dtype=torch.float32, device=args.device)
    model.config.use_cache = False
    peft_model = get_peft_model(model, HFTConfig(ratio=0.5, seed=0))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-5)
    rows, _ = packed_text(tokenizer, max(length for _, length in SPEED_SHAPES.values()))
    inputs = {what: rows[:n, :length].to(args.device) for what, (n, length) in SPEED_SHAPES.items()}

    def step(precision: str) -> None:
        peft_model.train()
        ids = inputs["train step"]
        with autocast(precision, args.device):
            loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def forward(precision: str) -> None:
        peft_model.eval()
        with torch.no_grad(), autocast(precision, args.device):
            peft_model(input_ids=inputs["forward"])

    seconds: dict[str, dict[str, list[float]]] = {w: {"fp32": [], "bf16": []} for w in SPEED_SHAPES}
    for round_ in tqdm(range(args.repeats + 1), desc="fp32 vs bf16 autocast"):
        for precision in ("fp32", "bf16"):
            for what, fn in (("train step", step), ("forward", forward)):
                elapsed = _timed(lambda fn=fn, precision=precision: fn(precision), args.device)
                if round_:  # round 0 warms up (allocator, oneDNN kernels, optimizer state)
                    seconds[what][precision].append(elapsed)
    table = {}
    for what, times in seconds.items():
        fp32, bf16 = statistics.median(times["fp32"]), statistics.median(times["bf16"])
        table[what] = {"shape": list(SPEED_SHAPES[what]), "fp32_s": fp32, "bf16_s": bf16, "bf16_over_fp32": bf16 / fp32,
                       "seconds": times}
    return {"auto": {"precision": choice.precision, "reason": choice.reason}, "timings": table}


def plot_speed(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["timings"])
    fig, ax = plt.subplots(figsize=(6.5, 3.6), dpi=120)
    width = 0.38
    for k, precision in enumerate(("fp32", "bf16")):
        values = [result["timings"][n][f"{precision}_s"] for n in names]
        bars = ax.bar([i + (k - 0.5) * width for i in range(len(names))], values, width,
                      label="fp32" if precision == "fp32" else "bf16 autocast (fp32 weights)")
        ax.bar_label(bars, fmt="%.2f s", fontsize=8)
    labels = [f"{n} ({'x'.join(map(str, result['timings'][n]['shape']))})\nbf16/fp32 = "
              f"{result['timings'][n]['bf16_over_fp32']:.2f}x" for n in names]
    ax.set_xticks(range(len(names)), labels, fontsize=8)
    ax.set_ylabel("median seconds")
    ax.legend(fontsize=8)
    ax.set_title(f"SmolLM2-135M-Instruct, HFT ratio 0.5, {result['machine']['device']}\n--precision auto here: "
                 f"{result['auto']['precision']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    if args.eager_optimizer:
        torch.compiler.set_stance("force_eager")
    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    machine = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()
               or platform.machine(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
               "torch": torch.__version__}
    out = Path(args.output)
    tag = "cuda" if args.device.startswith("cuda") else "cpu"
    if args.speed:
        result = {"machine": machine, "args": vars(args), **speed(args)}
        print(f"\n--precision auto on this machine: precision {result['auto']['precision']}: "
              f"{result['auto']['reason']}")
        print(f"{'':24}{'fp32':>10}{'bf16 autocast':>15}{'bf16 / fp32':>13}")
        for what, t in result["timings"].items():
            shape = "x".join(map(str, t["shape"]))
            print(f"{what + ' ' + shape:24}{t['fp32_s']:>9.3f}s{t['bf16_s']:>14.3f}s{t['bf16_over_fp32']:>12.2f}x")
        out.mkdir(parents=True, exist_ok=True)
        (out / f"precision-speed-{tag}.json").write_text(json.dumps(result, indent=2))
        plot_speed(result, out / f"precision-speed-{tag}.png")
        print(f"wrote {out / f'precision-speed-{tag}.json'} and .png")
        return
    from peft_hft.resources.default_model import load_default_model

    _, tokenizer = load_default_model()
    train_rows, eval_rows = packed_text(tokenizer, args.seq_len)
    eval_rows = eval_rows[: args.eval_sequences]
    names = ["HFT-fp32"] + [SHORT[k] for k in args.runs.split(",") if k and SHORT[k] != "HFT-fp32"]
    runs = {name: run(name, args, train_rows, eval_rows) for name in names}
    reference = runs["HFT-fp32"]["diffs"]
    for r in runs.values():
        r["learned"] = compare(r.pop("diffs"), reference)
    result = {
        "machine": machine,
        "args": vars(args),
        "runs": runs,
    }
    print(f"\n{'run':<48}{'held-out loss start -> end':>28}{'changed vs fp32':>17}{'norm vs fp32':>14}"
          f"{'cosine':>9}{'MiB kept':>10}")
    for name, r in runs.items():
        losses = list(r["held_out_loss"].values())
        print(f"{name:<48}{losses[0]:>17.4f} -> {losses[-1]:.4f}{r['learned']['changed_share_vs_fp32']:>17.3f}"
              f"{r['learned']['diff_norm_vs_fp32']:>14.3f}{r['learned']['cosine_with_fp32_diff']:>9.4f}"
              f"{r['master_bytes'] / 2**20:>10.1f}")
    out.mkdir(parents=True, exist_ok=True)
    tag = ("cuda" if args.device.startswith("cuda") else "cpu") + ("-tiny" if args.model == "tiny" else "")
    (out / f"precision-quality-{tag}.json").write_text(json.dumps(result, indent=2))
    plot(result, out / f"precision-quality-{tag}.png")
    print(f"wrote {out / f'precision-quality-{tag}.json'} and .png")


if __name__ == "__main__":
    main()
