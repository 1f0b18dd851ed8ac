"""Loading HFT adapters through transformers' own adapter API (``model.load_adapter(...)``).

transformers 5 loads adapter files with its model loader and a renaming table built for methods that add new weights
(``lora_A`` and the like). An HFT file holds diffs of existing weights, which must be *added* to them, so that loader
cannot apply it. ``patch_transformers`` wraps ``PeftAdapterMixin.load_adapter`` so that HFT adapters (recognised by
:func:`peft_hft.integrations.patching.is_hft_adapter`) go through PEFT's injection and state-dict path instead;
every other adapter type takes the original code path, with the original arguments.
"""

from __future__ import annotations

from typing import Any, Optional

from ..format.reader import read_adapter
from ..tuner.model import unchanged_on_failure, validate_adapter_name
from .patching import arguments, hub_kwargs, is_hft_adapter, patch

# transformers' PeftAdapterMixin.load_adapter(self, peft_model_id, adapter_name, peft_config, adapter_state_dict, ...)
_LOAD_ADAPTER_ARGS = ("peft_model_id", "adapter_name", "peft_config", "adapter_state_dict")


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


def _load_adapter(original):
    def load_adapter(self, *args, **kwargs):
        given = arguments(args, kwargs, _LOAD_ADAPTER_ARGS)
        hub = hub_kwargs(kwargs, kwargs.get("adapter_kwargs"))
        if len(args) > len(_LOAD_ADAPTER_ARGS) or not is_hft_adapter(
            given.get("peft_model_id"), given.get("peft_config"), hub
        ):
            return original(self, *args, **kwargs)
        return load_hft_adapter(self, **given, is_trainable=kwargs.get("is_trainable", False), hub_kwargs=hub)

    return load_adapter


def patch_transformers() -> None:
    """Route ``PreTrainedModel.load_adapter`` for HFT adapters through :func:`load_hft_adapter`. Idempotent."""
    from transformers.integrations.peft import PeftAdapterMixin

    patch(PeftAdapterMixin, "load_adapter", _load_adapter)
