"""Watch forgetting while training: KL to the starting model and perplexity on a small general-text probe.

Everyone watches the training loss; what the model loses shows only in an evaluation after the run. A
:class:`RetentionProbe` measures it cheaply at any time: a few general-text sequences, the mean token
KL(current || start) over them and their perplexity. The starting model's predictions are summarised **once**
(:meth:`RetentionProbe.reference`), so a measurement is one forward pass over the probe and never swaps weights or
disables adapters; it works the same for HFT, LoRA and plain (fully fine-tuned) models.

What is stored of the reference, and what the KL is exactly (``top_k``):

* ``top_k=K`` (default 256): per probe position, the reference's K largest log-probabilities (float32) and their
  token ids (int32), plus the log of the probability mass of every other token (float32, "the tail"), on the CPU:
  ``(8 K + 4)`` bytes per position, 8 MiB for 4,096 positions at K=256, whatever the vocabulary. The KL is then the
  exact KL divergence between the two distributions *coarsened* to those K tokens plus one tail bucket:
  ``sum_{v in top-K} p(v) (log p(v) - log q(v)) + P(tail) (log P(tail) - log Q(tail))`` with ``p`` the current model and
  ``q`` the reference. By the chain rule of KL this is a lower bound of the full-vocabulary KL; the gap is
  ``P(tail) KL(p | tail || q | tail)``, how differently the two models spread the mass they give to tokens outside the
  reference's top K (docs/forgetting.md reports the gap measured on SmolLM2).
* ``top_k=None``: the reference's full log-softmax in float32 on the CPU (``4 x vocab`` bytes per position: 192 KiB
  for SmolLM2's 49,152 tokens, 0.8 GiB for 4,096 positions) and the exact full-vocabulary KL.

The perplexity is ``exp`` of the mean next-token negative log-likelihood over the probe's tokens (token-level, not
lm-eval's word perplexity). Every measurement runs in ``model.eval()`` under ``torch.no_grad()`` (the model's mode is
restored afterwards), in the model's own dtype, under the autocast context it is given (the callback uses the
trainer's ``bf16``/``fp16`` setting), and the reference is computed under the same context, so the KL of an unchanged
model is exactly 0.

:class:`RetentionCallback` runs a probe inside ``transformers.Trainer`` and TRL's trainers: it logs
``retention/kl_to_base``, ``retention/ppl`` and ``retention/ppl_increase_pct`` into the trainer's logs every
``every`` steps (so they reach ``trainer.state.log_history``, the console, TensorBoard and W&B), and writes a PNG of
retention against the training loss to the output directory at the end. Plain training loops call
:meth:`RetentionCallback.begin` once, :meth:`RetentionCallback.step` after each optimiser step and
:meth:`RetentionCallback.end` at the end.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn
from transformers import TrainerCallback

PREFIX = "retention/"
KEYS = ("kl_to_base", "ppl", "ppl_increase_pct")
DEFAULT_TEXTS = 16
PLOT_NAME = "retention.png"


def default_texts(count: int = DEFAULT_TEXTS) -> list[str]:
    """The default probe: the first ``count`` Wikipedia paragraphs of ``peft_hft.resources`` (no Hub access)."""
    from ..resources.data import wikipedia_paragraphs

    return wikipedia_paragraphs()[:count]


# ------------------------------------------------------------------------------------------------------------------
# The KL helper (shared with the forgetting benchmark)
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class Reference:
    """What is kept of the reference model's predictions at the probe positions of one batch (on the CPU).

    ``values``: ``[positions, K]`` top-K log-probabilities, or ``[positions, vocab]`` full log-probabilities when
    ``index`` is None; ``index``: ``[positions, K]`` their token ids (int32); ``tail``: ``[positions]`` log of the mass
    outside the top K (None for the full form).
    """

    values: torch.Tensor
    index: Optional[torch.Tensor]
    tail: Optional[torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.index, self.tail) if t is not None)


def _log_mass_outside(log_probs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``log(1 - sum_{v in index} p(v))`` per row, computed as a logsumexp over the other tokens (no cancellation)."""
    masked = log_probs.scatter(-1, index, float("-inf"))
    return torch.logsumexp(masked, dim=-1)


def summarise_log_probs(log_probs: torch.Tensor, top_k: Optional[int]) -> Reference:
    """The :class:`Reference` of float32 log-probabilities ``[positions, vocab]`` (see the module docstring)."""
    if top_k is None or top_k >= log_probs.shape[-1]:
        return Reference(log_probs.float().cpu(), None, None)
    values, index = log_probs.topk(top_k, dim=-1)
    tail = _log_mass_outside(log_probs, index)
    return Reference(values.float().cpu(), index.to(torch.int32).cpu(), tail.float().cpu())


def token_kl(log_probs: torch.Tensor, reference: Reference) -> torch.Tensor:
    """KL(current || reference) at each position: ``[positions]`` float32 (see the module docstring for the top-K form).

    Args:
        log_probs: The current model's float32 log-probabilities ``[positions, vocab]`` at the reference's positions.
        reference: What :func:`summarise_log_probs` kept of the reference at those positions.
    """
    device = log_probs.device
    if reference.index is None:
        ref = reference.values.to(device)
        return (log_probs.exp() * (log_probs - ref)).sum(-1)
    index = reference.index.to(device).long()
    current = log_probs.gather(-1, index)
    ref = reference.values.to(device)
    head = (current.exp() * (current - ref)).sum(-1)
    tail = _log_mass_outside(log_probs, index)
    ref_tail = reference.tail.to(device)
    # P(tail) (log P(tail) - log Q(tail)), with 0 log 0 = 0 where the current model puts no mass outside the top K
    tail_term = torch.where(torch.isneginf(tail), torch.zeros_like(tail), tail.exp() * (tail - ref_tail))
    return head + tail_term


# ------------------------------------------------------------------------------------------------------------------
# The probe
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class ProbeMetrics:
    """One measurement: mean token KL to the reference (nats), perplexity and its relative increase (%)."""

    kl_to_base: float
    ppl: float
    ppl_increase_pct: float

    def as_logs(self) -> dict[str, float]:
        return {PREFIX + key: getattr(self, key) for key in KEYS}


def tokenize_texts(tokenizer: Any, texts: Sequence[str], max_length: int, batch_size: int) -> list[dict[str, Any]]:
    """Right-padded batches (``input_ids``, ``attention_mask``) of ``texts``, each cut to ``max_length`` tokens."""
    if not texts:
        raise ValueError("The retention probe needs at least one text.")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        pad = 0
    ids = [tokenizer(t, add_special_tokens=False).input_ids[:max_length] for t in texts]
    ids = [x for x in ids if len(x) >= 2]
    if not ids:
        raise ValueError("Every probe text is shorter than two tokens; give longer texts.")
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: less padding
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = [ids[i] for i in order[start : start + batch_size]]
        width = max(map(len, chunk))
        batches.append({
            "input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in chunk]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in chunk]),
        })
    return batches


class RetentionProbe:
    """Mean token KL to a reference model and perplexity on fixed general text (see the module docstring).

    Args:
        tokenizer: The model's tokenizer.
        texts: The probe texts (default: :func:`default_texts`, 16 Wikipedia paragraphs).
        max_length: Tokens kept of each text.
        batch_size: Sequences per forward pass.
        top_k: Reference log-probabilities kept per position (None: all, the exact KL; see the module docstring).
        kl_positions: ``"all"``: the KL at every token of the text (what the next token after each prefix is
            predicted to be, the last one included), ``"last"``: at the last token only (the distribution of the
            answer that follows a prompt). The perplexity always covers every next-token prediction inside a text.
    """

    def __init__(self, tokenizer: Any, texts: Optional[Sequence[str]] = None, max_length: int = 128,
                 batch_size: int = 8, top_k: Optional[int] = 256, kl_positions: str = "all") -> None:
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be None (exact KL) or a positive number of tokens, got {top_k}.")
        if kl_positions not in ("all", "last"):
            raise ValueError(f"kl_positions must be 'all' or 'last', got {kl_positions!r}.")
        self.top_k = top_k
        self.kl_positions = kl_positions
        self.batches = tokenize_texts(tokenizer, list(texts) if texts is not None else default_texts(), max_length,
                                      batch_size)
        self.references: Optional[list[Reference]] = None
        self.base_ppl: Optional[float] = None

    @property
    def tokens(self) -> int:
        return int(sum(int(b["attention_mask"].sum()) for b in self.batches))

    @property
    def reference_bytes(self) -> int:
        """Host memory the stored reference takes."""
        return sum(r.nbytes for r in self.references or [])

    def _kl_mask(self, mask: torch.Tensor) -> torch.Tensor:
        if self.kl_positions == "all":
            return mask.bool()
        last = mask.sum(-1) - 1
        out = torch.zeros_like(mask, dtype=torch.bool)
        out[torch.arange(mask.shape[0]), last] = True
        return out

    def _passes(self, model: nn.Module, autocast: Optional[AbstractContextManager]):
        """Per batch: (float32 log-probs at the KL positions, summed NLL of the next tokens, their count)."""
        was_training = model.training
        device = next(model.parameters()).device
        model.eval()
        try:
            with torch.no_grad():
                for batch in self.batches:
                    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
                    with autocast if autocast is not None else nullcontext():
                        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                    log_probs = torch.log_softmax(logits.float(), dim=-1)
                    del logits
                    targets = mask[:, 1:].bool()
                    picked = log_probs[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
                    nll = -float(picked[targets].double().sum())
                    yield log_probs[self._kl_mask(mask)], nll, int(targets.sum())
        finally:
            model.train(was_training)

    def reference(self, model: nn.Module, autocast: Optional[AbstractContextManager] = None) -> None:
        """Summarise ``model``'s predictions as the reference ("the base") every later KL is measured against."""
        references, nll, count = [], 0.0, 0
        for log_probs, batch_nll, batch_count in self._passes(model, autocast):
            references.append(summarise_log_probs(log_probs, self.top_k))
            nll, count = nll + batch_nll, count + batch_count
        self.references, self.base_ppl = references, math.exp(nll / count)

    def measure(self, model: nn.Module, autocast: Optional[AbstractContextManager] = None) -> ProbeMetrics:
        """KL to the reference, perplexity and its increase for ``model`` now (one forward pass over the probe)."""
        if self.references is None:
            raise RuntimeError("Call RetentionProbe.reference(model) on the starting model before measuring.")
        kl_sum, positions, nll, count = 0.0, 0, 0.0, 0
        for (log_probs, batch_nll, batch_count), ref in zip(self._passes(model, autocast), self.references,
                                                            strict=True):
            kl = token_kl(log_probs, ref)
            kl_sum, positions = kl_sum + float(kl.double().sum()), positions + kl.numel()
            nll, count = nll + batch_nll, count + batch_count
        ppl = math.exp(nll / count)
        return ProbeMetrics(kl_sum / positions, ppl, 100.0 * (ppl / self.base_ppl - 1.0))


# ------------------------------------------------------------------------------------------------------------------
# The trainer callback
# ------------------------------------------------------------------------------------------------------------------


def _trainer_autocast(args: Any, device: torch.device) -> Optional[AbstractContextManager]:
    """The autocast the Trainer trains under (its ``bf16``/``fp16`` flags), so the probe computes alike."""
    if getattr(args, "bf16", False):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if getattr(args, "fp16", False):
        return torch.autocast(device.type, dtype=torch.float16)
    return None


def _reporting_first(callback: TrainerCallback) -> None:
    """Move ``callback`` in front of the trainer's reporting callbacks (TensorBoard, W&B, ...).

    The Trainer appends the callbacks a user passes after its reporting integrations, and each ``on_log`` sees the
    ``logs`` dict as the callbacks before it left it: the retention values added by a callback behind them would reach
    ``state.log_history`` and the console but not TensorBoard or W&B. ``TrainerCallback`` events carry no handle to
    the trainer, so the handler is found as the caller of this event (``CallbackHandler.call_event``); moving an
    element that was already called to an earlier place in the list it iterates over neither repeats nor skips anyone.
    """
    from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback

    frame = sys._getframe(1)
    while frame is not None and not isinstance(frame.f_locals.get("self"), CallbackHandler):
        frame = frame.f_back
    if frame is None:
        return
    callbacks = frame.f_locals["self"].callbacks
    if callback not in callbacks:
        return
    callbacks.remove(callback)
    first = next((i for i, c in enumerate(callbacks) if not isinstance(c, DefaultFlowCallback)), len(callbacks))
    callbacks.insert(first, callback)


class RetentionCallback(TrainerCallback):
    """Log how much of its general-text behaviour the model keeps while it trains (see the module docstring).

    With ``transformers.Trainer`` or TRL's trainers::

        trainer = SFTTrainer(..., callbacks=[peft_hft.RetentionCallback(every=50)])

    logs ``retention/kl_to_base``, ``retention/ppl`` and ``retention/ppl_increase_pct`` at step 0 (in
    :attr:`history`; the KL there is 0), every ``every`` steps and at the last step, and writes
    ``<output_dir>/retention.png`` at the end. In a plain training loop::

        retention = peft_hft.RetentionCallback(every=10, print_metrics=True)
        retention.begin(model, tokenizer)
        for step, batch in enumerate(batches, 1):
            loss = ...; loss.backward(); optimizer.step(); optimizer.zero_grad()
            retention.step(model, step, loss.item())
        retention.end("out")  # writes out/retention.png

    Args:
        every: Measure every this many optimiser steps (and at the last one).
        texts: Probe texts (default: 16 Wikipedia paragraphs from ``peft_hft.resources``, no Hub access).
        tokenizer: Tokenizer of the probe (default: the trainer's ``processing_class``).
        max_length / batch_size / top_k: See :class:`RetentionProbe`.
        plot: Write the PNG at the end of training.
        print_metrics: Also print each measurement (plain loops; a Trainer prints its logs itself).
    """

    def __init__(self, every: int = 50, texts: Optional[Sequence[str]] = None, tokenizer: Any = None,
                 max_length: int = 128, batch_size: int = 8, top_k: Optional[int] = 256, plot: bool = True,
                 print_metrics: bool = False) -> None:
        if every < 1:
            raise ValueError(f"every must be a positive number of steps, got {every}.")
        self.every = every
        self.texts = list(texts) if texts is not None else None
        self.tokenizer = tokenizer
        self.max_length, self.batch_size, self.top_k = max_length, batch_size, top_k
        self.plot, self.print_metrics = plot, print_metrics
        self.probe: Optional[RetentionProbe] = None
        self.history: list[dict[str, float]] = []  # {"step", "loss" (if known), retention/...} per measurement
        self.losses: list[tuple[int, float]] = []  # (step, training loss) seen in plain loops and trainer logs
        self.seconds: list[float] = []  # wall time of each measurement after the reference
        self._autocast: Callable[[], Optional[AbstractContextManager]] = lambda: None
        self._pending: Optional[dict[str, float]] = None

    # -- plain loops --------------------------------------------------------------------------------------------

    def begin(self, model: nn.Module, tokenizer: Any = None,
              autocast: Optional[Callable[[], Optional[AbstractContextManager]]] = None) -> dict[str, float]:
        """Summarise ``model`` as the reference (once) and record step 0; returns its logs (KL 0)."""
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        if tokenizer is None:
            raise ValueError("RetentionCallback needs a tokenizer: pass tokenizer=... (or train with a Trainer that "
                             "has a processing_class).")
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a multimodal processor wraps its tokenizer
        if autocast is not None:
            self._autocast = autocast
        self.probe = RetentionProbe(tokenizer, self.texts, self.max_length, self.batch_size, self.top_k)
        self.probe.reference(model, self._autocast())
        self.history, self.losses, self.seconds = [], [], []
        return self._measure(model, 0)

    def step(self, model: nn.Module, step: int, loss: Optional[float] = None,
             last: bool = False) -> Optional[dict[str, float]]:
        """After optimiser step ``step``: record ``loss``; measure when due (every ``every`` steps, or ``last``)."""
        if loss is not None:
            self.losses.append((step, float(loss)))
        if step % self.every and not last:
            return None
        return self._measure(model, step)

    def end(self, output_dir: Optional[Union[str, Path]] = None) -> Optional[Path]:
        """Write the PNG of retention against training loss to ``output_dir`` (returns its path, None if no plot)."""
        if not self.plot or output_dir is None or not self.history:
            return None
        path = Path(output_dir) / PLOT_NAME
        plot_retention(self.history, self.losses, path)
        return path

    def _measure(self, model: nn.Module, step: int) -> dict[str, float]:
        import time

        start = time.perf_counter()
        metrics = self.probe.measure(model, self._autocast()).as_logs()
        if step:
            self.seconds.append(time.perf_counter() - start)
        record = {"step": step, **metrics}
        self.history.append(record)
        if self.print_metrics:
            from tqdm.auto import tqdm

            tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        return metrics

    # -- transformers.Trainer events ---------------------------------------------------------------------------

    def on_init_end(self, args, state, control, **kwargs):
        _reporting_first(self)

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        _reporting_first(self)  # also when the callback was added with trainer.add_callback after init
        device = next(model.parameters()).device
        self.begin(model, self.tokenizer if self.tokenizer is not None else processing_class,
                   autocast=lambda: _trainer_autocast(args, device))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # every rank measures: a sharded model (FSDP, ZeRO-3) needs all of them in the forward pass
        metrics = self.step(model, state.global_step, last=state.global_step >= state.max_steps)
        if metrics is not None:
            self._pending = {"step": state.global_step, **metrics}
            control.should_log = True  # the Trainer logs this step, and on_log adds the values to those logs
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            self.losses.append((state.global_step, float(logs["loss"])))
        if self._pending is None or logs is None or self._pending["step"] != state.global_step:
            return
        values = {k: v for k, v in self._pending.items() if k != "step"}
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)  # the Trainer appended a copy of logs before calling on_log
        self._pending = None

    def on_train_end(self, args, state, control, **kwargs):
        if self._pending is not None:  # measured but never logged (a trainer that skipped the log): keep it
            state.log_history.append(dict(self._pending))
            self._pending = None
        if state.is_world_process_zero:
            self.end(args.output_dir)


def plot_retention(history: Sequence[dict[str, float]], losses: Sequence[tuple[int, float]], path: Path) -> None:
    """KL to the base and perplexity increase against the step, with the training loss on a second axis."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from ..utils import save_png

    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "kl_to_base", "mean token KL to the base (nats)"),
                           (axes[1], "ppl_increase_pct", "probe perplexity increase (%)")):
        ax.plot(steps, [h[PREFIX + key] for h in history], "o-", color="tab:red", label=label)
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(label, color="tab:red")
        ax.grid(alpha=0.3)
        if losses:
            twin = ax.twinx()
            twin.plot([s for s, _ in losses], [v for _, v in losses], color="tab:blue", alpha=0.6, lw=1)
            twin.set_ylabel("training loss", color="tab:blue")
    fig.suptitle("Retention while training: what the model keeps (red) against what it learns (blue)")
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
