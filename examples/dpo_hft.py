"""Direct preference optimisation with Half Fine-Tuning (HFT) through TRL's ``DPOTrainer``, without a second model.

DPO compares the policy with a frozen reference. With ``peft_config=HFTConfig(...)`` and ``ref_model=None``, TRL gets
the reference log-probabilities from the same model inside ``disable_adapter()``: HFT then swaps the original values
of the trained half back in (by reference in memory, no recomputation), so no copy of the model is ever made.

Runs on the embedded SmolLM2-135M-Instruct with llamafactory's ``dpo_en_demo.json`` (300 preference pairs, fetched
once from PyPI; likely derived from CC BY-NC data: non-commercial use)::

    python examples/dpo_hft.py                                   # defaults: a few minutes on 2 CPU cores
    python examples/dpo_hft.py --reference precompute            # reference log-probs once, before training
    python examples/sft_hft.py --output-dir outputs/sft && \\
        python examples/dpo_hft.py --sft-adapter outputs/sft --seed 1   # SFT then DPO: two HFT stages
    python examples/dpo_hft.py --method fft                      # full fine-tuning + a reference copy, to compare
    accelerate launch examples/dpo_hft.py --max-steps 10

Prints held-out DPO metrics before and after training: reward accuracy (how often the implicit reward
``beta * (log pi - log pi_ref)`` ranks the chosen answer above the rejected one) and reward margin. Before training the
policy is the reference, so both rewards are exactly 0.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any, Optional

from _common import (
    Resources,
    base_parser,
    check_args,
    load_model_and_tokenizer,
    take,
    train_and_report,
    training_kwargs,
)
from datasets import Dataset
from peft import PeftModel
from trl import DPOConfig, DPOTrainer

from peft_hft import HFTConfig
from peft_hft.resources.chat_data import preference_example, split
from peft_hft.resources.data import dpo_demo

METRICS = [
    "eval_loss",
    "eval_rewards/accuracies",
    "eval_rewards/margins",
    "eval_rewards/chosen",
    "eval_rewards/rejected",
    "eval_logps/chosen",
    "eval_logps/rejected",
]


def parse_args(argv: Optional[list[str]]):
    parser = base_parser(__doc__.splitlines()[0], steps=16, lr=1e-5, max_length=128, train_size=0, eval_size=16)
    parser.set_defaults(batch_size=2)
    parser.add_argument("--beta", type=float, default=0.1, help="DPO's KL weight")
    parser.add_argument(
        "--reference",
        choices=["disable", "precompute"],
        default="disable",
        help="reference log-probs: from the model with the adapter disabled at every step, or once before training",
    )
    parser.add_argument(
        "--originals-device",
        choices=["cpu", "device"],
        default="cpu",
        help="HFT: keep the original values in host memory (default) or beside the weights (free disable_adapter)",
    )
    parser.add_argument(
        "--method", choices=["hft", "fft"], default="hft", help="fft: full fine-tuning with a reference model copy"
    )
    parser.add_argument("--sft-adapter", default=None, help="an HFT SFT adapter to merge first (stage 1 of 2)")
    args = parser.parse_args(argv)
    check_args(args)
    return args


def short_prompts(tokenizer, pairs: list[dict], limit: int) -> list[dict]:
    """Pairs whose chat-formatted prompt fits in ``limit`` tokens, so truncation leaves the answers to compare."""
    kept = []
    for pair in pairs:
        text = tokenizer.apply_chat_template(pair["prompt"], add_generation_prompt=True, tokenize=False)
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= limit:
            kept.append(pair)
    return kept


def merge_stage(model, adapter_dir: str, seed: int):
    """Stage boundary: merge the previous stage's HFT adapter into the weights; the next stage draws a new selection."""
    stage = PeftModel.from_pretrained(model, adapter_dir)
    previous = stage.peft_config["default"]
    if getattr(previous, "seed", None) == seed:
        warnings.warn(
            f"--seed {seed} is the seed of the SFT stage in {adapter_dir}, so DPO trains the same tensors. The paper "
            "draws a fresh selection per stage: pass another --seed.",
            stacklevel=2,
        )
    return stage.merge_and_unload(), {"stage": "sft", "adapter": adapter_dir, "seed": getattr(previous, "seed", None)}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    output_dir = Path(args.output_dir or "outputs/dpo_hft")

    used = Resources()  # after the imports, before the model: the CPU memory baseline
    model, tokenizer = load_model_and_tokenizer(args.model)
    stages = []
    if args.sft_adapter:
        model, stage = merge_stage(model, args.sft_adapter, args.seed)
        stages.append(stage)
    pairs = short_prompts(tokenizer, [preference_example(r) for r in dpo_demo()], args.max_length // 2)
    train, held_out = split(pairs, args.eval_size, seed=1234)

    config = DPOConfig(
        **training_kwargs(args, output_dir),
        beta=args.beta,
        precompute_ref_log_probs=args.reference == "precompute",
    )
    if args.method == "hft":
        peft_config = HFTConfig(
            ratio=args.ratio, seed=args.seed, originals_device=args.originals_device, task_type="CAUSAL_LM"
        )
        ref_model = None  # the reference is the same model with the adapter disabled
    else:
        peft_config = None
        # Full fine-tuning needs the frozen reference as a second model (unless the log-probs are precomputed).
        ref_model = None if args.reference == "precompute" else copy.deepcopy(model).eval()
    with used:
        trainer = DPOTrainer(
            model=model,
            ref_model=ref_model,
            args=config,
            train_dataset=Dataset.from_list(take(train, args.train_size)),
            eval_dataset=Dataset.from_list(held_out),
            processing_class=tokenizer,
            peft_config=peft_config,
        )
    if trainer.accelerator.is_main_process and args.method == "hft":
        trainer.model.print_trainable_parameters()
    stages.append({"stage": "dpo", "adapter": str(output_dir), "seed": args.seed if args.method == "hft" else None})
    title = f"Held-out DPO metrics ({len(held_out)} pairs)"
    pairs_used = {"train": len(take(train, args.train_size)), "held_out": len(held_out)}
    return train_and_report(trainer, args, output_dir, used, METRICS, title, example="dpo_hft", pairs=pairs_used,
                            stages=stages)


if __name__ == "__main__":
    main()
