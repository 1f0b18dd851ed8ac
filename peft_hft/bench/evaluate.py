"""Score an in-memory model on evaluation sets with lm-eval (``HFLM`` around the live model, local tasks only), or,
with ``packed=True``, with the same metrics computed by the package's batched scorers: one forward pass per
multiple-choice item (:mod:`.shared_context`) and lm-eval's perplexity windows batched by tokens
(:mod:`.perplexity`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..utils import resolve_precision
from .perplexity import perplexity_scores
from .shared_context import multiple_choice_scores
from .tasks import EvalSpec, lm_eval_task


@contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """Silence lm-eval's per-task INFO/WARNING chatter (its progress bars stay); restore the levels afterwards."""
    loggers = [logging.getLogger(name) for name in ("lm_eval", "lm-eval")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    specs: list[EvalSpec],
    batch_size: int = 16,
    precision: str = "auto",
    packed: bool = False,
) -> dict[str, dict[str, float]]:
    """Evaluate ``model`` (a transformers model or a PeftModel) on ``specs`` with lm-eval.

    Args:
        precision: ``"fp32"``, ``"bf16"`` (autocast) or ``"auto"`` (from the hardware, see
            :func:`peft_hft.utils.resolve_precision`).
        packed: Score without lm-eval's request machinery, with the same metrics: multiple-choice sets with one
            forward pass per item (the context once, every answer after it) instead of one request per answer (the
            same ``acc``/``acc_norm``, 2-4x fewer tokens computed), perplexity sets with lm-eval's own windows
            batched by tokens (the same ``word_perplexity``, ``byte_perplexity``, ``bits_per_byte``).

    Returns:
        ``{spec name: {metric: value}}``, e.g. ``{"mmlu": {"acc": 0.31, "acc_norm": 0.33}}``.
    """
    if not specs:
        return {}
    precision = resolve_precision(precision, next(model.parameters()).device).precision
    if packed:
        scorers = {"multiple_choice": multiple_choice_scores, "perplexity": perplexity_scores}
        unknown = [spec.name for spec in specs if spec.kind not in scorers]
        if unknown:
            raise ValueError(f"No packed scorer for {unknown}; score them with packed=False (lm-eval).")
        was_training = model.training
        model.eval()
        try:
            return {spec.name: scorers[spec.kind](model, tokenizer, spec, batch_size, precision) for spec in specs}
        finally:
            model.train(was_training)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tasks are local; make any stray Hub access fail loudly
    try:
        from lm_eval.evaluator import evaluate as lm_eval_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise ImportError(
            f"The forgetting benchmark scores models with lm-eval, which could not be imported ({exc}). Install it "
            "with `pip install 'peft-hft[examples]'` (or `pip install 'lm-eval>=0.4.9'`)."
        ) from exc

    was_training = model.training
    model.eval()
    with _quiet_lm_eval():
        lm = HFLM(
            pretrained=model,
            tokenizer=tokenizer,
            batch_size=batch_size,
            mixed_precision_dtype=torch.bfloat16 if precision == "bf16" else None,
        )
        tasks = {spec.name: lm_eval_task(spec) for spec in specs}
        # lm_eval.evaluator.evaluate rather than simple_evaluate: the latter adds environment information to its
        # output (torch's collect_env runs subprocesses, ~2 s a call) and nothing else these tasks need (they
        # are zero-shot, set in their configs; no task index: include_defaults=False).
        loaded = TaskManager(include_defaults=False).load(list(tasks.values()))
        output = lm_eval_evaluate(lm=lm, task_dict=loaded, bootstrap_iters=0, log_samples=False)
    model.train(was_training)
    results = {}
    for name, task in tasks.items():
        raw = output["results"][task.config.task]
        results[name] = {
            key.split(",")[0]: float(value)
            for key, value in raw.items()
            if "," in key and not key.split(",")[0].endswith("_stderr") and isinstance(value, (int, float))
        }
    return results
