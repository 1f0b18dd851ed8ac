"""Turn the pinned demo data (:mod:`peft_hft.resources.data`) into the conversational formats TRL's trainers take.

TRL applies the tokenizer's chat template itself when examples are lists of ``{"role", "content"}`` messages, and it
computes the loss on the completion only when the prompt is a separate field. So SFT examples become
``{"prompt": [...], "completion": [...]}`` and preference pairs ``{"prompt": [...], "chosen": [...],
"rejected": [...]}``. Nothing here touches the network; fetching is :mod:`peft_hft.resources.data`'s job.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, TypeVar

Message = dict[str, str]
T = TypeVar("T")

# ShareGPT speaker names (the llamafactory DPO demo uses "human"/"gpt") mapped to chat-template roles.
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def instruction_example(record: dict[str, str]) -> dict[str, list[Message]]:
    """An Alpaca record (``instruction``, ``input``, ``output``) as a prompt/completion pair of messages."""
    missing = [key for key in ("instruction", "output") if key not in record]
    if missing:
        raise ValueError(
            f"An instruction record needs 'instruction' and 'output' (and optionally 'input'); {missing} missing "
            f"from a record with keys {sorted(record)}."
        )
    question = record["instruction"].strip()
    if record.get("input", "").strip():
        question = f"{question}\n\n{record['input'].strip()}"
    return {
        "prompt": [{"role": "user", "content": question}],
        "completion": [{"role": "assistant", "content": record["output"].strip()}],
    }


def _message(turn: dict[str, str]) -> Message:
    speaker = turn.get("from", turn.get("role"))
    if speaker not in _ROLES:
        raise ValueError(
            f"Unknown speaker {speaker!r} in a conversation turn; expected one of {sorted(_ROLES)} under 'from' "
            "(ShareGPT) or 'role'."
        )
    return {"role": _ROLES[speaker], "content": turn.get("value", turn.get("content", "")).strip()}


def preference_example(record: dict[str, Any]) -> dict[str, list[Message]]:
    """A ShareGPT preference record (``conversations``, ``chosen``, ``rejected``) as prompt/chosen/rejected messages."""
    missing = [key for key in ("conversations", "chosen", "rejected") if key not in record]
    if missing:
        raise ValueError(
            f"A preference record needs 'conversations', 'chosen' and 'rejected'; {missing} missing from a record "
            f"with keys {sorted(record)}."
        )
    return {
        "prompt": [_message(turn) for turn in record["conversations"]],
        "chosen": [_message(record["chosen"])],
        "rejected": [_message(record["rejected"])],
    }


def split(records: Sequence[T], eval_size: int, seed: int = 0) -> tuple[list[T], list[T]]:
    """Shuffle ``records`` with ``seed`` and hold out the last ``eval_size`` of them: ``(train, held_out)``."""
    if not 0 <= eval_size < len(records):
        raise ValueError(f"eval_size must be in [0, {len(records)}) for {len(records)} records, got {eval_size}.")
    order = list(records)
    random.Random(seed).shuffle(order)
    cut = len(order) - eval_size
    return order[:cut], order[cut:]
