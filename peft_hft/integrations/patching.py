"""How peft-hft wraps PEFT and transformers functions, and the one test of whether an adapter is an HFT adapter.

Since the startup hook imports peft-hft in every process that imports peft, its patches run for every PEFT user,
HFT or not. Each one therefore starts with :func:`is_hft_adapter` (or, for a model already in memory, whether it holds
an HFT adapter) and, for anything else, calls PEFT's original with the original arguments and returns its result
untouched: other methods see PEFT unchanged, exceptions included. docs/integrations.md lists every patch, why PEFT
needs it and the upstream hook that would make it unnecessary.

:func:`patch` is the one way a function is replaced: it marks the wrapper so that importing or reloading peft-hft
twice never wraps a wrapper, and keeps classmethods classmethods.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Optional

from ..format.keys import ADAPTER_CONFIG

PATCH_MARKER = "_peft_hft_patched"
PEFT_TYPE = "HFT"
# The download arguments PEFT and transformers pass on to ``hf_hub_download``.
HUB_KWARGS = ("revision", "subfolder", "token", "cache_dir", "local_files_only", "force_download", "proxies")
# Fields only an HFT adapter_config.json has: a damaged HFT config (no or a wrong ``peft_type``) is still recognised.
_HFT_ONLY_FIELDS = ("selected_parameters", "base_fingerprint")
_HFT_TEXT = re.compile(r'"peft_type"\s*:\s*"(?:PeftType\.)?HFT"|"(?:' + "|".join(_HFT_ONLY_FIELDS) + r')"\s*:')


def is_patched(function: Any) -> bool:
    """True for a wrapper installed by :func:`patch`."""
    return bool(getattr(function, PATCH_MARKER, False))


def patch(owner: Any, name: str, wrap: Callable[[Callable], Callable], also: Iterable[Any] = ()) -> None:
    """Replace ``owner.name`` by ``wrap(original)`` (once; a classmethod stays one).

    ``also``: other modules that hold the same function object under ``name`` (``from x import f`` copies), which
    get the same wrapper.
    """
    current = getattr(owner, name)
    as_classmethod = inspect.ismethod(current) and current.__self__ is owner
    original = current.__func__ if as_classmethod else current
    if is_patched(original):
        return
    wrapper = functools.wraps(original)(wrap(original))
    setattr(wrapper, PATCH_MARKER, True)
    setattr(owner, name, classmethod(wrapper) if as_classmethod else wrapper)
    for other in also:
        if getattr(other, name, None) is original:
            setattr(other, name, wrapper)


def arguments(args: tuple, kwargs: Mapping[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """The arguments ``names`` of a call (positionally first, in that order, or by keyword); missing ones absent.

    A wrapper reads what it needs with this and still calls the original with ``*args, **kwargs`` as given.
    """
    names = tuple(names)
    found = dict(zip(names, args[: len(names)], strict=False))
    found.update({k: kwargs[k] for k in names if k in kwargs})
    return found


def hft_configs(peft_model: Any) -> dict[str, Any]:
    """The HFT adapters' configs of a model in memory (empty for other methods): the test for patches on models."""
    from ..tuner.config import HFTConfig

    configs = getattr(peft_model, "peft_config", None) or {}
    if not isinstance(configs, Mapping):
        return {}
    return {name: c for name, c in configs.items() if isinstance(c, HFTConfig)}


def hub_kwargs(*sources: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """The download arguments among the keyword arguments ``sources`` (later ones win), ``None`` values dropped."""
    merged: dict[str, Any] = {}
    for source in sources:
        merged.update({k: v for k, v in (source or {}).items() if k in HUB_KWARGS and v is not None})
    return merged


def looks_like_hft_config(text: str) -> bool:
    """Whether the text of an ``adapter_config.json`` belongs to an HFT adapter, also when it is damaged.

    A config that parses decides by its ``peft_type``: ``"HFT"``, or another PEFT method's name; without a usable one
    (missing, not a string, no method's name) by HFT-only fields. One that does not parse by the same marks in its
    text. Anything else is another method's, whose errors are PEFT's to report.
    """
    try:
        config = json.loads(text)
    except ValueError:
        return _HFT_TEXT.search(text) is not None
    if not isinstance(config, dict):
        return False
    peft_type = config.get("peft_type")
    if isinstance(peft_type, str) and peft_type.split(".")[-1] == PEFT_TYPE:
        return True
    if isinstance(peft_type, str) and peft_type.split(".")[-1] in _peft_methods():
        return False  # another method's config, whatever else it holds
    return any(field in config for field in _HFT_ONLY_FIELDS)  # no usable peft_type: HFT's own fields decide


def _peft_methods() -> set[str]:
    from peft.utils.peft_types import PeftType

    return {member.value for member in PeftType} - {PEFT_TYPE}


def _config_file(model_id: str, hub: dict[str, Any]) -> Optional[Path]:
    """The adapter_config.json PEFT is about to read: local, or the Hub's (the very download PEFT makes next)."""
    subfolder = hub.get("subfolder")
    local = Path(model_id, subfolder or "", ADAPTER_CONFIG)
    if local.is_file():
        return local
    if Path(model_id).exists():
        return None  # a local directory without a config: PEFT's own error names it
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    from ..format.checkpoint import is_repo_id

    if not is_repo_id(model_id):
        return None
    try:
        filename = f"{subfolder}/{ADAPTER_CONFIG}" if subfolder else ADAPTER_CONFIG
        cached = try_to_load_from_cache(
            model_id, filename, cache_dir=hub.get("cache_dir"), revision=hub.get("revision")
        )
        if isinstance(cached, str):
            return Path(cached)
        kwargs = {k: v for k, v in hub.items() if k != "subfolder"}
        return Path(hf_hub_download(model_id, ADAPTER_CONFIG, subfolder=subfolder, **kwargs))
    except Exception:  # not resolvable here: PEFT's own call reports it in its own words
        return None


def is_hft_adapter(model_id: Any, config: Any = None, hub: Optional[Mapping[str, Any]] = None) -> bool:
    """Whether the adapter PEFT or transformers is about to load is an HFT adapter. Never raises.

    ``config`` (a ``PeftConfig`` or its dict) decides when given; otherwise the adapter's ``adapter_config.json``
    does (see :func:`looks_like_hft_config`). A Hub id's config is the one file PEFT downloads first anyway; fetched
    here with PEFT's arguments, it is in the cache when PEFT asks for it.
    """
    if config is not None:
        peft_type = config.get("peft_type") if isinstance(config, Mapping) else getattr(config, "peft_type", None)
        return str(getattr(peft_type, "value", peft_type)).split(".")[-1] == PEFT_TYPE
    if model_id is None or not isinstance(model_id, (str, Path)):
        return False
    path = _config_file(str(model_id), dict(hub or {}))
    if path is None:
        return False
    try:
        return looks_like_hft_config(path.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return False


__all__ = [
    "HUB_KWARGS",
    "PATCH_MARKER",
    "arguments",
    "hft_configs",
    "hub_kwargs",
    "is_hft_adapter",
    "is_patched",
    "looks_like_hft_config",
    "patch",
]
