"""One fine-tuning run: AdamW, linear warm-up then linear decay, gradient clipping, a fixed list of batches.

A plain loop rather than ``transformers.Trainer``: every method must see the very same batches in the same order
under the same schedule, and the loop has nothing else to decide. Two things make it cheap without changing what it
computes: where only some tokens carry a label (``loss="completion"``: the answer of each example), only those
positions go through the LM head (``_label_logits``; the loss is the same mean over the same tokens), and AdamW runs
fused (one kernel over all tensors). On SmolLM2-135M with 8 headlines per step that takes a CPU training step from
about 2.2 s to 1.1 s. ``transformers.TrainerCallback`` objects still plug
in (``callbacks=``): the loop drives their step and log events as ``Trainer`` does. Mixed precision (bf16 autocast)
keeps fp32 master weights, as on a GPU; ``precision="auto"`` (the default) takes it where the hardware computes bf16
natively (on CPUs with bf16 units it is about 1.4x faster than fp32; on CPUs without, it is emulated and 7-28x
slower), see :func:`peft_hft.utils.resolve_precision`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ..integrations.low_memory import OptimizerInBackward
from ..utils import PRECISIONS, autocast, resolve_precision

__all__ = ["PRECISIONS", "autocast", "train", "warmup_linear_decay"]


def warmup_linear_decay(optimizer: torch.optim.Optimizer, steps: int, warmup: float = 0.1):
    """The schedule every benchmark trains with: linear warm-up over ``warmup`` of the ``steps``, then linear decay
    to 0 (``scheduler.step()`` after each optimiser step)."""
    warmup_steps = max(1, math.ceil(warmup * steps)) if warmup > 0 else 0

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (steps - step) / max(1, steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    lr: float,
    warmup: float = 0.1,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    precision: str = "auto",
    desc: Optional[str] = None,
    callbacks: Sequence[Any] = (),
    training_args: Any = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
) -> dict[str, Any]:
    """Train ``model``'s trainable parameters on ``batches`` (one optimiser step each) and report the loss curve.

    Args:
        precision: ``"fp32"``, ``"bf16"`` (autocast, fp32 weights) or ``"auto"`` (from the hardware).
        callbacks: ``transformers.TrainerCallback`` objects; they get ``on_train_begin``, ``on_step_begin``,
            ``on_step_end`` (with ``model``, ``optimizer``, ``lr_scheduler``), ``on_log`` (loss, learning rate) and
            ``on_train_end``, and can stop the run with ``control.should_training_stop``.
        training_args: The ``TrainingArguments`` the callbacks see (default: one describing this run).
        optimizer: An optimizer over the trainable tensors instead of the loop's AdamW (``lr`` and ``weight_decay``
            are then its own), e.g. ``optimizer_in_backward(model, ...)``, which steps in backward: there is nothing
            left to clip, so it needs ``max_grad_norm=0``.

    Returns:
        ``{"loss": [per-step loss], "seconds": wall time, "cpu_seconds": process CPU time,
        "trainable_parameters": count, "precision": the resolved precision}``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("The model has no trainable parameters; nothing to fine-tune.")
    if not batches:
        raise ValueError("No training batches: set at least one step.")
    device = params[0].device
    precision = resolve_precision(precision, device).precision
    if optimizer is None:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=_fusable(params) or None)
    elif max_grad_norm and isinstance(optimizer, OptimizerInBackward):
        raise ValueError(
            f"max_grad_norm={max_grad_norm} with an optimizer that steps in backward: the gradients are used and "
            "freed before the loop could clip them, so the run would train unclipped. Fix: max_grad_norm=0."
        )
    scheduler = warmup_linear_decay(optimizer, len(batches), warmup)
    events = _Callbacks(callbacks, training_args, len(batches), lr, model, optimizer, scheduler)
    losses: list[float] = []
    model.train()
    start, cpu_start = time.perf_counter(), time.process_time()
    events("on_train_begin")
    with tqdm(batches, desc=desc or "training", leave=False) as bar:
        for batch in bar:
            events("on_step_begin")
            loss = training_step(model, batch, precision)
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss)
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(
                    f"Training loss became {losses[-1]} at step {len(losses)} with lr={lr}; lower the learning rate."
                )
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if events.step_end(loss):
                break
    events("on_train_end")
    model.eval()
    return {
        "loss": losses,
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu_start,  # all threads; comparable across machine loads
        "trainable_parameters": sum(p.numel() for p in params),
        "precision": precision,
    }


def training_step(model: nn.Module, batch: dict[str, torch.Tensor], precision: str) -> float:
    """Forward (under the autocast of the resolved ``precision``) and backward of one batch; returns the loss."""
    device = next(p for p in model.parameters() if p.requires_grad).device
    batch = {k: v.to(device) for k, v in batch.items()}
    with autocast(precision, device):
        loss = _label_logits_loss(model, batch) if _few_labels(batch) else model(**batch).loss
    loss.backward()
    return loss.item()


def _few_labels(batch: dict[str, torch.Tensor]) -> bool:
    """Whether fewer than half of the positions predict a label (answer-only loss): then the LM head over the
    others is most of its cost and :func:`_label_logits_loss` skips it."""
    labels = batch.get("labels")
    return labels is not None and labels.dim() == 2 and 2 * int((labels[:, 1:] != -100).sum()) < labels[:, 1:].numel()


def _fusable(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW takes these tensors (floating point, on the CPU or a CUDA device)."""
    return all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
               for p in params)


def _label_logits_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The causal-LM loss of ``batch`` (the mean cross-entropy of every labelled token given the ones before it, as
    the model's own ``labels=`` loss) with the LM head applied to the positions that predict a label only.

    The model runs its own forward; a pre-hook on its output embeddings keeps the hidden states of those positions
    (as one row), so whatever the model does to the logits after the head (a scale, a soft cap) still applies.
    """
    labels = batch["labels"]
    targets = labels[:, 1:]
    rows, cols = (targets != -100).nonzero(as_tuple=True)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return model(**batch).loss

    def keep_labelled(_module, args):
        return (args[0][rows, cols].unsqueeze(0), *args[1:])

    handle = head.register_forward_pre_hook(keep_labelled)
    try:
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    finally:
        handle.remove()
    return torch.nn.functional.cross_entropy(logits[0].float(), targets[rows, cols])


class _Callbacks:
    """Drives ``transformers.TrainerCallback`` events from the plain loop, with the state ``Trainer`` would keep."""

    def __init__(self, callbacks: Sequence[Any], args: Any, steps: int, lr: float, model, optimizer, scheduler):
        self.callbacks = list(callbacks)
        if not self.callbacks:
            return
        from transformers import TrainerControl, TrainerState, TrainingArguments

        self.args = args if args is not None else TrainingArguments(
            output_dir="peft-hft-train", max_steps=steps, learning_rate=lr, report_to=[], save_strategy="no"
        )
        self.state = TrainerState(max_steps=steps, num_train_epochs=1, is_local_process_zero=True,
                                  is_world_process_zero=True)
        self.control = TrainerControl()
        self.objects = {"model": model, "optimizer": optimizer, "lr_scheduler": scheduler}

    def __call__(self, event: str, **kwargs: Any) -> None:
        for callback in self.callbacks:
            result = getattr(callback, event)(self.args, self.state, self.control, **self.objects, **kwargs)
            if result is not None:
                self.control = result

    def step_end(self, loss: float) -> bool:
        """Advance the state by one step, send ``on_step_end`` and ``on_log``; True when a callback stops the run."""
        if not self.callbacks:
            return False
        self.state.global_step += 1
        self.state.epoch = self.state.global_step / self.state.max_steps
        self("on_step_end")
        logs = {"loss": loss, "learning_rate": self.objects["lr_scheduler"].get_last_lr()[0], "step":
                self.state.global_step}
        self.state.log_history.append(logs)
        self("on_log", logs=logs)
        return self.control.should_training_stop
