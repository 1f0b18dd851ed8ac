"""Loading HFT adapters through transformers' own adapter API (``model.load_adapter(...)``).

transformers 5 loads adapter files with its model loader and a renaming table built for methods that add new weights
(``lora_A`` and the like). An HFT file holds diffs of existing weights, which must be *added* to them, so that loader
cannot apply it. ``patch_transformers`` wraps ``PeftAdapterMixin.load_adapter`` so that HFT adapters (recognised by
``"peft_type": "HFT"`` in ``adapter_config.json``) go through PEFT's injection and state-dict path instead; every other
adapter type takes the original code path unchanged.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

from ..format.reader import peek_peft_type, read_adapter
from ..tuner.model import unchanged_on_failure, validate_adapter_name

_PATCH_MARKER = "_peft_hft_patched"
_HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "subfolder", "force_download", "proxies")


def _hub_kwargs(kwargs: dict[str, Any], adapter_kwargs: Optional[dict[str, Any]]) -> dict[str, Any]:
    merged = {k: v for k, v in kwargs.items() if k in _HUB_KWARGS and v is not None}
    merged.update({k: v for k, v in (adapter_kwargs or {}).items() if k in _HUB_KWARGS and v is not None})
    return merged


def _is_hft_adapter(peft_model_id: Optional[str], peft_config: Any, hub_kwargs: dict[str, Any]) -> bool:
    from ..tuner.config import HFTConfig

    if peft_config is not None:
        return isinstance(peft_config, HFTConfig) or (
            isinstance(peft_config, dict) and str(peft_config.get("peft_type")) == "HFT"
        )
    kwargs = dict(hub_kwargs)
    subfolder = kwargs.pop("subfolder", None)
    return peek_peft_type(peft_model_id, subfolder=subfolder, **kwargs) == "HFT"


def load_hft_adapter(
    model: Any,
    peft_model_id: Optional[str],
    adapter_name: Optional[str] = None,
    peft_config: Any = None,
    adapter_state_dict: Optional[dict] = None,
    is_trainable: bool = False,
    hub_kwargs: Optional[dict[str, Any]] = None,
):
    """Load an HFT adapter into a plain transformers model, like ``PeftModel.load_adapter`` does for a PeftModel."""
    from peft import PeftConfig, inject_adapter_in_model, set_peft_model_state_dict

    from .loading import config_of

    hub_kwargs = hub_kwargs or {}
    adapter_name = adapter_name or "default"
    validate_adapter_name(adapter_name)
    if getattr(model, "_hf_peft_config_loaded", False) and adapter_name in getattr(model, "peft_config", {}):
        raise ValueError(f"Adapter with name {adapter_name} already exists. Please use a different name.")
    if peft_model_id is not None and (peft_config is None or adapter_state_dict is None):
        # everything read and validated before the model is touched
        download = dict(hub_kwargs)
        revision, subfolder = download.pop("revision", None), download.pop("subfolder", None)
        adapter = read_adapter(str(peft_model_id), revision=revision, subfolder=subfolder, hub_kwargs=download)
        if peft_config is None:
            peft_config = config_of(adapter)
        if adapter_state_dict is None:
            adapter_state_dict = adapter.state_dict()
    if isinstance(peft_config, dict):
        peft_config = PeftConfig.from_peft_type(**peft_config)
    peft_config.inference_mode = not is_trainable
    with unchanged_on_failure(model, adapter_name):
        inject_adapter_in_model(peft_config, model, adapter_name)
        model._hf_peft_config_loaded = True
        result = set_peft_model_state_dict(model, adapter_state_dict, adapter_name=adapter_name)
    if not getattr(model, "peft_config", None):
        model._hf_peft_config_loaded = False
    if not is_trainable:
        model.eval()
    return result


def patch_transformers() -> None:
    """Route ``PreTrainedModel.load_adapter`` for HFT adapters through :func:`load_hft_adapter`. Idempotent."""
    from transformers.integrations.peft import PeftAdapterMixin

    original = PeftAdapterMixin.load_adapter
    if getattr(original, _PATCH_MARKER, False):
        return

    @functools.wraps(original)
    def load_adapter(self, peft_model_id=None, adapter_name=None, peft_config=None, adapter_state_dict=None, *args,
                     **kwargs):
        hub_kwargs = _hub_kwargs(kwargs, kwargs.get("adapter_kwargs"))
        if not args and _is_hft_adapter(peft_model_id, peft_config, hub_kwargs):
            return load_hft_adapter(
                self,
                peft_model_id,
                adapter_name=adapter_name,
                peft_config=peft_config,
                adapter_state_dict=adapter_state_dict,
                is_trainable=kwargs.get("is_trainable", False),
                hub_kwargs=hub_kwargs,
            )
        return original(self, peft_model_id, adapter_name, peft_config, adapter_state_dict, *args, **kwargs)

    setattr(load_adapter, _PATCH_MARKER, True)
    PeftAdapterMixin.load_adapter = load_adapter
