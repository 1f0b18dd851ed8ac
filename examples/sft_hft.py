"""Supervised fine-tuning with Half Fine-Tuning (HFT) through TRL's ``SFTTrainer``.

HFT trains a random half of every transformer block's tensors (2 of q/k/v/o, half of the MLP, 1 of 2 norms) plus the
embeddings, and freezes the rest. With TRL this is one argument: ``peft_config=HFTConfig(...)``. The saved adapter
holds only the trained tensors, as differences from the base model.

Runs on the embedded SmolLM2-135M-Instruct with llamafactory's ``alpaca_en_demo.json`` (999 instruction/response
pairs, fetched once from PyPI; likely Alpaca-derived, CC BY-NC 4.0: non-commercial use)::

    python examples/sft_hft.py                          # defaults: a few minutes on 2 CPU cores
    python examples/sft_hft.py --max-steps 200 --ratio 0.5 --seed 1 --output-dir outputs/sft
    accelerate launch examples/sft_hft.py --max-steps 20

Precision follows the hardware: bf16 autocast where the GPU or CPU computes bf16 natively, fp32 elsewhere.
Prints the held-out loss before and after training.
"""

from __future__ import annotations

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
from trl import SFTConfig, SFTTrainer

from peft_hft import HFTConfig, selection_summary
from peft_hft.resources.chat_data import instruction_example, split
from peft_hft.resources.data import alpaca_demo

METRICS = ["eval_loss", "eval_mean_token_accuracy", "eval_entropy"]


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = base_parser(__doc__.splitlines()[0], steps=20, lr=5e-5, max_length=128, train_size=0, eval_size=24)
    args = parser.parse_args(argv)
    check_args(args)
    output_dir = Path(args.output_dir or "outputs/sft_hft")

    used = Resources()  # after the imports, before the model: the CPU memory baseline
    model, tokenizer = load_model_and_tokenizer(args.model)
    # The split seed is fixed, so runs with different --seed values are evaluated on the same held-out examples.
    train, held_out = split([instruction_example(r) for r in alpaca_demo()], args.eval_size, seed=1234)

    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(**training_kwargs(args, output_dir)),
        train_dataset=Dataset.from_list(take(train, args.train_size)),
        eval_dataset=Dataset.from_list(held_out),
        processing_class=tokenizer,
        peft_config=HFTConfig(ratio=args.ratio, seed=args.seed, task_type="CAUSAL_LM"),
    )
    if trainer.accelerator.is_main_process:
        trainer.model.print_trainable_parameters()
        print(selection_summary(trainer.model))
    title = f"Held-out SFT metrics ({len(held_out)} examples)"
    return train_and_report(trainer, args, output_dir, used, METRICS, title, example="sft_hft")


if __name__ == "__main__":
    main()
