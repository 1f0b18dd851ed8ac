"""Multiple-choice log-likelihoods with one forward pass per question: the context once, every answer after it.

lm-eval scores a multiple-choice item as one request per answer, each a forward pass over context + answer, so the
context (for MMLU most of the tokens) is computed once per answer. Here each item becomes one packed sequence,
``context, answer 1, answer 2, ...``, whose answers restart their positions where the context ends and attend to the
context and to their own earlier tokens only (a 4-D attention mask). Every answer token then sees exactly what it
sees in lm-eval's request, so the log-likelihoods, ``acc`` and ``acc_norm`` are lm-eval's (tokenisation included:
context and continuation are split as ``HFLM`` splits them), at the cost of one pass per item. Only the positions
that predict an answer token go through the LM head (rows are left-padded, so those are the last few of every row).
A two-answer item with single-token answers after a shared space (the sarcasm headlines: " 0" / " 1") costs one pass
instead of two.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..utils import autocast
from .batching import token_batches
from .tasks import EvalSpec

# A batch of ``batch_size`` items pads to at most ``batch_size x TOKENS_PER_ROW`` tokens (see .batching): 128 keeps
# 16 items of MMLU's typical length together and puts its longest questions (about 450 tokens) four to a batch.
TOKENS_PER_ROW = 128


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids exactly as lm-eval's ``HFLM._encode_pair`` splits them: trailing spaces of the
    context move to the continuation, and the continuation is what the whole string adds to the context's tokens."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    context_ids = tokenizer(context, add_special_tokens=False).input_ids
    return context_ids, whole[len(context_ids):]


def _packed(context: list[int], answers: list[list[int]]) -> tuple[list[int], list[int], list[int]]:
    """Input ids, positions and segment ids (0: context, k: answer k) of one packed item: the context, then every
    answer without its last token (that one is only predicted, never read)."""
    ids, positions, segments = list(context), list(range(len(context))), [0] * len(context)
    for k, answer in enumerate(answers, 1):
        ids += answer[:-1]
        positions += range(len(context), len(context) + len(answer) - 1)
        segments += [k] * (len(answer) - 1)
    return ids, positions, segments


def _mask(segments: list[int]) -> torch.Tensor:
    """Boolean attention mask of one (left-padded, segment -1) packed item: causal, and an answer sees the context
    and itself only."""
    seg = torch.tensor(segments)
    width = len(segments)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = (seg[:, None] == seg[None, :]) | (seg[None, :] == 0)
    valid = (seg[:, None] >= 0) & (seg[None, :] >= 0)
    mask = causal & same & valid
    return mask | torch.eye(width, dtype=torch.bool)  # padding rows attend to themselves (no empty softmax rows)


@torch.inference_mode()
def choice_loglikelihoods(
    model: nn.Module, tokenizer: Any, spec: EvalSpec, batch_size: int = 16, precision: str = "fp32"
) -> list[list[float]]:
    """For every row of ``spec`` (multiple choice), the log-likelihood of each answer given the query: lm-eval's
    ``loglikelihood`` of ``(query, target_delimiter + choice)``, computed with one forward pass per row."""
    if spec.kind != "multiple_choice":
        raise ValueError(f"{spec.name} is a {spec.kind} set; shared-context scoring is for multiple choice only.")
    items = []
    for row in spec.rows:
        pairs = [encode_pair(tokenizer, row["query"], spec.target_delimiter + choice) for choice in row["choices"]]
        context = pairs[0][0]
        if any(c != context for c, _ in pairs) or not context or any(not a for _, a in pairs):
            raise ValueError(f"{spec.name}: an item whose answers change the context's tokens cannot share it.")
        items.append((context, [a for _, a in pairs]))
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    packed = [_packed(context, answers) for context, answers in items]
    scores: list[list[float]] = [[] for _ in items]
    for chunk in token_batches([len(ids) for ids, _, _ in packed], batch_size, batch_size * TOKENS_PER_ROW):
        width = max(len(packed[i][0]) for i in chunk)
        # left padding: every item ends at the last position, so the positions whose logits are read (the context's
        # last token and the answers) are the last few of every row, and only those go through the LM head
        offsets = [width - len(packed[i][0]) for i in chunk]
        input_ids = torch.tensor([[pad] * o + packed[i][0] for o, i in zip(offsets, chunk, strict=True)], device=device)
        positions = torch.tensor([[0] * o + packed[i][1] for o, i in zip(offsets, chunk, strict=True)], device=device)
        mask = torch.stack([_mask([-1] * o + packed[i][2]) for o, i in zip(offsets, chunk, strict=True)])
        first = min(o + len(items[i][0]) - 1 for o, i in zip(offsets, chunk, strict=True))
        with autocast(precision, device):
            logits = model(input_ids=input_ids, attention_mask=mask[:, None].to(device), position_ids=positions,
                           logits_to_keep=width - first).logits
        logprobs = logits.float().log_softmax(-1)
        for row_logprobs, offset, i in zip(logprobs, offsets, chunk, strict=True):
            context, answers = items[i]
            segments = packed[i][2]
            for k, answer in enumerate(answers, 1):
                # the answer's first token is predicted at the context's last position, the rest inside segment k
                where = [len(context) - 1] + [p for p, s in enumerate(segments) if s == k]
                scores[i].append(float(row_logprobs[[offset + p - first for p in where], answer].sum()))
    return scores


def multiple_choice_scores(
    model: nn.Module, tokenizer: Any, spec: EvalSpec, batch_size: int = 16, precision: str = "fp32"
) -> dict[str, float]:
    """``{"acc": ..., "acc_norm": ...}`` of ``spec`` (a multiple-choice :class:`EvalSpec`) as lm-eval computes them
    (``acc``: the answer of highest log-likelihood is the gold one; ``acc_norm``: the same per character of the
    answer), with one forward pass per item."""
    correct = correct_norm = 0
    for row, lls in zip(spec.rows, choice_loglikelihoods(model, tokenizer, spec, batch_size, precision), strict=True):
        normed = [ll / len(choice) for ll, choice in zip(lls, row["choices"], strict=True)]
        correct += int(max(range(len(lls)), key=lls.__getitem__) == row["gold"])
        correct_norm += int(max(range(len(normed)), key=normed.__getitem__) == row["gold"])
    return {"acc": correct / len(spec.rows), "acc_norm": correct_norm / len(spec.rows)}
