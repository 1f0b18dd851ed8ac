"""Post-hoc interpolations base + alpha x diff of a trained model, for the learn-forget frontier, without retraining.

Each method goes through its own artefact, as a user would dial it down:

* HFT: the saved adapter, scaled with ``peft_hft.scale_adapter`` (``peft-hft scale``) and loaded onto a fresh copy
  of the base;
* full fine-tuning: the tuned checkpoint made an HFT diff adapter with ``peft-hft diff``'s operation
  (``extract_adapter``), then the same as HFT;
* LoRA: the adapter's own scale (``LoraLayer.set_scale``: ``base + alpha * (lora_alpha / r) * B A``), restored to 1
  afterwards.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from torch import nn


def _is_lora(model: nn.Module) -> bool:
    config = getattr(model, "peft_config", {}).get("default")
    return config is not None and str(getattr(config, "peft_type", "")).endswith("LORA")


def interpolations(base: nn.Module, model: nn.Module, alphas: Sequence[float],
                   workdir: Path) -> Iterator[tuple[float, nn.Module]]:
    """Yield ``(alpha, base + alpha * (model - base))`` for each alpha; ``workdir`` holds the files meanwhile (removed
    at the end). ``model`` is a PeftModel (HFT or LoRA) or a fully fine-tuned model of ``base``'s class."""
    if _is_lora(model):
        from peft.tuners.lora import LoraLayer

        layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        try:
            for alpha in alphas:
                for layer in layers:
                    layer.set_scale("default", alpha)
                yield alpha, model
        finally:
            for layer in layers:
                layer.set_scale("default", 1.0)
        return

    from peft import PeftModel

    from ..ops.scale import scale_adapter

    workdir = Path(workdir)
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    try:
        adapter = workdir / "adapter"
        if hasattr(model, "peft_config"):
            model.save_pretrained(adapter)
        else:
            from ..ops.extract import extract_adapter

            base.save_pretrained(workdir / "base")
            model.save_pretrained(workdir / "tuned")
            extract_adapter(workdir / "tuned", workdir / "base", adapter, progress=False)
            shutil.rmtree(workdir / "tuned")
        for alpha in alphas:
            scaled = workdir / f"alpha{alpha:g}"
            scale_adapter(adapter, scaled, alpha, progress=False)
            mixed = PeftModel.from_pretrained(copy.deepcopy(base), scaled)
            mixed.eval()
            yield alpha, mixed
            del mixed
            shutil.rmtree(scaled)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
