"""Names on disk: the checkpoint keys of HFT diffs and the file names of adapters and checkpoints.

One place for the format's names, so the tuner (saving, loading), the offline operations (merge, extract, inspect)
and the continual stage history agree on them by construction.
"""

from __future__ import annotations

import re
from typing import Optional

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# Saved diffs live under `<module path>.hft_diff.<parameter attribute>`, prefixed like every PEFT checkpoint key.
# The `hft_diff` segment keeps them from ever matching a base-model weight: a generic loader that strips PEFT's prefix
# must not load a diff as if it were a weight.
DIFF_SEGMENT = "hft_diff"
PEFT_KEY_PREFIX = "base_model.model."
_DIFF_KEY_RE = re.compile(rf"^(?:{re.escape(PEFT_KEY_PREFIX)})?(?:(?P<module>.+)\.)?{DIFF_SEGMENT}\.(?P<attr>[^.]+)$")


def diff_key(parameter_name: str) -> str:
    """Checkpoint key of the diff of ``parameter_name`` (e.g. ``...q_proj.weight`` -> ``...q_proj.hft_diff.weight``)."""
    module, _, attr = parameter_name.rpartition(".")
    return f"{PEFT_KEY_PREFIX}{module + '.' if module else ''}{DIFF_SEGMENT}.{attr}"


def parameter_name_of(key: str) -> Optional[str]:
    """Inverse of :func:`diff_key`; ``None`` for keys that are not HFT diffs."""
    match = _DIFF_KEY_RE.match(key)
    if match is None:
        return None
    module = match.group("module")
    return f"{module}.{match.group('attr')}" if module else match.group("attr")


# Encoded diffs (see encoding.py) store auxiliary parts beside the main tensor, under `<diff key>.<part>`.
PART_NAMES = ("exc_idx", "exc_val", "scales", "mask")
_PART_KEY_RE = re.compile(rf"^(?P<diff>.+)\.(?P<part>{'|'.join(PART_NAMES)})$")


def part_key(parameter_name: str, part: str) -> str:
    """Checkpoint key of an encoded diff's part (``""``: the main tensor, :func:`diff_key`)."""
    return diff_key(parameter_name) + (f".{part}" if part else "")


def split_part_key(key: str) -> Optional[tuple[str, str]]:
    """``(parameter name, part)`` of an encoded diff's part key; ``None`` for other keys (main diffs included)."""
    match = _PART_KEY_RE.match(key)
    if match is None:
        return None
    name = parameter_name_of(match.group("diff"))
    return None if name is None else (name, match.group("part"))
