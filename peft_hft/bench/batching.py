"""Batches of similar lengths under a token budget, for scoring: padding is compute thrown away.

Sorting by length and cutting every ``max_rows`` items pads a batch to its longest item; with a few long items
(MMLU questions of 450 tokens next to ones of 60) that wastes a third of the forward passes. Cutting instead where
``rows x longest`` would pass ``max_tokens`` keeps the long items in small batches and the short ones in full ones.
"""

from __future__ import annotations

from collections.abc import Sequence


def token_batches(lengths: Sequence[int], max_rows: int, max_tokens: int) -> list[list[int]]:
    """Indices of ``lengths`` in batches, longest first: each batch has at most ``max_rows`` items and pads to at most
    ``max_tokens`` tokens (``rows x its longest``); an item longer than ``max_tokens`` is a batch of its own."""
    if max_rows < 1 or max_tokens < 1:
        raise ValueError(f"max_rows and max_tokens must be positive, got {max_rows} and {max_tokens}.")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for index in order:
        current = batches[-1] if batches else None
        if current and len(current) < max_rows and (len(current) + 1) * lengths[current[0]] <= max_tokens:
            current.append(index)
        else:
            batches.append([index])
    return batches
