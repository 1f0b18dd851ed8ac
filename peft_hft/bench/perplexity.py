"""lm-eval's rolling-loglikelihood perplexities (``word_perplexity``, ``byte_perplexity``, ``bits_per_byte``) of a
perplexity set, with its windows batched by tokens.

lm-eval's ``HFLM`` scores a perplexity set as one request per document, cut into rolling windows of the model's
context length, and pads every batch to its longest window. Here the windows are lm-eval's own (its tokenisation
rule, ``get_rolling_token_windows`` and ``make_disjoint_window``, the context length ``resolve_max_length`` gives
``HFLM``), so the log-likelihoods and the metrics are lm-eval's; only the batching differs (:mod:`.batching`: on 40
Wikipedia paragraphs a quarter fewer padded tokens), and there is no task to build.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn

from ..utils import autocast
from .batching import token_batches
from .tasks import EvalSpec

# A batch of ``batch_size`` windows pads to at most ``batch_size x TOKENS_PER_ROW`` tokens.
TOKENS_PER_ROW = 128


def _windows(model: nn.Module, tokenizer: Any, text: str) -> list[tuple[list[int], list[int]]]:
    """The windows lm-eval's ``HFLM.loglikelihood_rolling`` scores for ``text``: (input ids, the tokens its last
    positions predict)."""
    from lm_eval.models.utils import has_bos_prefix, resolve_max_length
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    keyword = {"add_special_tokens": False} if has_bos_prefix(text, tokenizer.decode(prefix)) else {}
    tokens = tokenizer.encode(text, **keyword)
    max_length = resolve_max_length(model.config, tokenizer, default=2048)
    return [((context + continuation)[:-1], continuation)
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(tokens, prefix,
                                                                                             max_length, 1))]


@torch.inference_mode()
def document_loglikelihoods(
    model: nn.Module, tokenizer: Any, spec: EvalSpec, batch_size: int = 16, precision: str = "fp32"
) -> list[float]:
    """The log-likelihood of every document of ``spec`` (a perplexity set), summed over its windows."""
    if spec.kind != "perplexity":
        raise ValueError(f"{spec.name} is a {spec.kind} set; rolling log-likelihoods are for perplexity sets.")
    windows = [(doc, ids, scored) for doc, row in enumerate(spec.rows)
               for ids, scored in _windows(model, tokenizer, row["text"])]
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    totals = [0.0] * len(spec.rows)
    for chunk in token_batches([len(ids) for _, ids, _ in windows], batch_size, batch_size * TOKENS_PER_ROW):
        width = max(len(windows[i][1]) for i in chunk)
        ids = torch.tensor([windows[i][1] + [pad] * (width - len(windows[i][1])) for i in chunk], device=device)
        mask = torch.tensor([[1] * len(windows[i][1]) + [0] * (width - len(windows[i][1])) for i in chunk],
                            device=device)
        with autocast(precision, device):
            logits = model(input_ids=ids, attention_mask=mask).logits
        for row, i in enumerate(chunk):
            doc, window, scored = windows[i]
            # the last len(scored) input positions predict the scored tokens (right padding: they end at len(window))
            rows = logits[row, len(window) - len(scored):len(window)].float().log_softmax(-1)
            totals[doc] += float(rows.gather(-1, torch.tensor(scored, device=device)[:, None]).sum())
    return totals


def perplexity_scores(
    model: nn.Module, tokenizer: Any, spec: EvalSpec, batch_size: int = 16, precision: str = "fp32"
) -> dict[str, float]:
    """``{"word_perplexity", "byte_perplexity", "bits_per_byte"}`` of ``spec`` as lm-eval aggregates them: the
    document log-likelihoods over lm-eval's word count (``re.split(r"\\s+", text)``) and UTF-8 byte count."""
    total = sum(document_loglikelihoods(model, tokenizer, spec, batch_size, precision))
    words = sum(len(re.split(r"\s+", row["text"])) for row in spec.rows)
    size = sum(len(row["text"].encode("utf-8")) for row in spec.rows)
    return {"word_perplexity": math.exp(-total / words), "byte_perplexity": math.exp(-total / size),
            "bits_per_byte": -total / size / math.log(2)}
