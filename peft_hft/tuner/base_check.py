"""Recording and checking the base an HFT adapter belongs to, on a model held by the ledger.

The hashing and the comparison rules live in :mod:`peft_hft.format.fingerprint` (pure functions of tensors and
records); this module applies them to the ledger's original values: :func:`record_base` when an adapter is saved,
:func:`verify_base` when one is loaded.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Optional

import torch

from ..format.checkpoint import is_repo_id
from ..format.fingerprint import (
    base_check_skipped,
    check_fingerprint,
    fingerprint_tensors,
    make_fingerprint,
    validate_fingerprint,
)
from .selection import canonical_name_map


def cached_revision(repo_id: str) -> Optional[str]:
    """The commit of ``repo_id`` in the local Hub cache, if the cache holds exactly one (else unknown: ``None``).

    transformers 5 does not record which commit a model was loaded from; with a single cached snapshot it can only
    have been that one.
    """
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    snapshots = os.path.join(constants.HF_HUB_CACHE, repo_folder_name(repo_id=repo_id, repo_type="model"), "snapshots")
    try:
        commits = [c for c in os.listdir(snapshots) if len(c) == 40]
    except OSError:
        return None
    return commits[0] if len(commits) == 1 else None


def base_identity(model: torch.nn.Module, config: Any = None) -> tuple[Optional[str], Optional[str]]:
    """(base model id or path, revision) of a loaded model, as far as they are known."""
    model_config = getattr(model, "config", None)
    name = (
        getattr(config, "base_model_name_or_path", None)
        or getattr(model, "name_or_path", None)
        or getattr(model_config, "_name_or_path", None)
    )
    name = str(name) if name else None
    revision = getattr(config, "revision", None) or getattr(model_config, "_commit_hash", None)

    if revision is None and is_repo_id(name):
        revision = cached_revision(name)
    return name, revision


def record_base(ledger, adapter_name: str, config: Any = None) -> dict[str, Any]:
    """The base fingerprint of ``adapter_name`` (computed once per base tensor and cached)."""
    names = ledger.hft_adapters[adapter_name].params
    records = fingerprint_tensors({name: (lambda name=name: ledger.original(name)) for name in names}, cache=True)
    return make_fingerprint(records, *base_identity(ledger.root, config))


def verify_base(ledger, config, adapter_name: str) -> None:
    """Check that the model holding ``ledger`` is the base ``config.base_fingerprint`` records (unless skipped)."""
    fingerprint = getattr(config, "base_fingerprint", None)
    if base_check_skipped():
        return
    if not fingerprint:
        warnings.warn(
            f"The HFT adapter {adapter_name!r} records no base fingerprint (saved by an older peft-hft or written by "
            "hand), so it cannot be checked against this base model. Re-save it with peft-hft to record one.",
            stacklevel=2,
        )
        return
    validate_fingerprint(fingerprint)
    selected = set(ledger.hft_adapters[adapter_name].params)
    recorded = list(fingerprint["tensors"])
    aliases = canonical_name_map(ledger.root)  # one walk of the model, not one per recorded tensor
    canonical = {name: aliases.get(name, name) for name in recorded}
    loaders = {
        name: (lambda c=canonical[name]: ledger.original(c)) for name in recorded if canonical[name] in selected
    }
    check_fingerprint(fingerprint, loaders, f"The HFT adapter {adapter_name!r}")
