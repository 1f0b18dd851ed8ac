"""HFT -> LoRA: a standard LoRA adapter made by truncated SVD of each HFT diff, for stacks that serve LoRA only.

Serving stacks with multi-adapter support (vLLM, TGI, LoRAX) load LoRA adapters, and PEFT's own
``peft.convert_to_lora`` works per tuner layer, which HFT does not have (one ledger holds every tensor). This module
writes what ``convert_to_lora`` would: a ``LoraConfig`` with ``r == lora_alpha`` (scaling 1, folded into the factors)
and ``lora_A``/``lora_B`` weights, so the result loads with plain ``PeftModel.from_pretrained``:

* the weight diff ``D`` of an ``nn.Linear`` becomes ``B @ A`` from the top-``rank`` singular triplets of ``D``
  (``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) Vh_r``); exact when ``rank >= min(D.shape)``;
* the weight diff of an ``nn.Embedding`` becomes a LoRA embedding (``lora_embedding_A``/``_B``); a tied input/output
  embedding gets a LoRA on both modules, since LoRA's embedding adapter does not change the tied output head;
  (``embeddings="drop"`` leaves the embedding diffs out instead: LoRA on a *tied* embedding breaks transformers'
  ``tie_weights()``, which lm-eval's ``hf`` model calls, and several servers take no embedding LoRA at all);
* every other diff (norms, biases, tensors of other module types) cannot be a low-rank product. With
  ``others="modules_to_save"`` (default) its module is stored in full, tuned, under LoRA's ``modules_to_save``
  (exact, and tiny for norms); ``others="drop"`` leaves it out and reports it (for servers that reject
  ``modules_to_save``).

Where ``rank`` exceeds a matrix's smaller side, that module gets its full rank through ``rank_pattern``, as PEFT's
conversion does with dynamic ranks. :class:`LoraConversionReport` says what was lost: the relative Frobenius error of
each diff (from the discarded singular values, exact) and the diffs that were dropped.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

import torch
from peft import LoraConfig
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ..format.checkpoint import is_repo_id
from ..format.keys import ADAPTER_CONFIG, PEFT_KEY_PREFIX
from ..format.reader import load_config_json
from ..tuner.layer import find_ledger
from ..tuner.selection import embedding_parameter_names
from ..utils import atomic_directory, check_output

REPORT_NAME = "lora_conversion.json"
LORA_WEIGHTS_NAME = "adapter_model.safetensors"
Others = Literal["modules_to_save", "drop"]
Embeddings = Literal["lora", "drop"]


@dataclass
class TensorReport:
    """How one HFT diff was converted."""

    name: str
    as_: str  # "lora", "lora_embedding", "modules_to_save" or "dropped"
    shape: list[int]
    rank: int  # LoRA rank used (0 when not a LoRA)
    full_rank: int  # min(shape) for matrices
    relative_error: float  # ||D - D_lora|| / ||D|| (Frobenius); 0 for exact, 1 for dropped
    diff_norm: float


@dataclass
class LoraConversionReport:
    """What a LoRA conversion kept of an HFT adapter (also written as ``lora_conversion.json``)."""

    rank: int
    tensors: list[TensorReport] = field(default_factory=list)

    @property
    def relative_error(self) -> float:
        """Relative Frobenius error over all diffs together: sqrt(sum of squared errors / sum of squared norms)."""
        total = sum(t.diff_norm**2 for t in self.tensors)
        lost = sum((t.relative_error * t.diff_norm) ** 2 for t in self.tensors)
        return math.sqrt(lost / total) if total > 0 else 0.0

    @property
    def max_relative_error(self) -> float:
        return max((t.relative_error for t in self.tensors), default=0.0)

    @property
    def dropped(self) -> list[str]:
        return [t.name for t in self.tensors if t.as_ == "dropped"]

    def lora_parameters(self) -> int:
        """Parameters in the LoRA factors (modules_to_save not included)."""
        count = 0
        for t in self.tensors:
            if t.as_ in ("lora", "lora_embedding"):
                count += t.rank * sum(t.shape)
        return count

    def to_dict(self) -> dict:
        return {
            "rank": self.rank,
            "relative_error": self.relative_error,
            "max_relative_error": self.max_relative_error,
            "dropped": self.dropped,
            "lora_parameters": self.lora_parameters(),
            "tensors": [asdict(t) for t in self.tensors],
        }

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for t in self.tensors:
            kinds[t.as_] = kinds.get(t.as_, 0) + 1
        parts = ", ".join(f"{n} as {k}" for k, n in sorted(kinds.items()))
        return (
            f"rank {self.rank}: {len(self.tensors)} diffs ({parts}); relative error {self.relative_error:.4f} overall, "
            f"{self.max_relative_error:.4f} at worst; {self.lora_parameters():,} LoRA parameters"
        )


def convert_to_lora(
    model: nn.Module,
    rank: int,
    adapter_name: str = "default",
    others: Others = "modules_to_save",
    dtype: Optional[torch.dtype] = None,
    progressbar: bool = False,
    embeddings: Embeddings = "lora",
) -> tuple[LoraConfig, dict[str, torch.Tensor], LoraConversionReport]:
    """Convert the HFT adapter ``adapter_name`` of ``model`` (a PeftModel or HFTModel) to LoRA.

    Returns ``(lora_config, state_dict, report)``; the first two are what ``peft.convert_to_lora`` returns (keys
    without the adapter name, as in a saved adapter). LoRA factors are in ``dtype`` (default: each tensor's dtype).
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}.")
    if others not in ("modules_to_save", "drop"):
        raise ValueError(f"others must be 'modules_to_save' or 'drop', got {others!r}.")
    if embeddings not in ("lora", "drop"):
        raise ValueError(f"embeddings must be 'lora' or 'drop', got {embeddings!r}.")
    ledger = find_ledger(model)
    if ledger is None or adapter_name not in ledger.hft_adapters:
        available = sorted(ledger.hft_adapters) if ledger is not None else []
        raise ValueError(f"No HFT adapter named {adapter_name!r} in this model (HFT adapters: {available}).")
    root = ledger.root
    configs = getattr(model, "peft_config", None) or getattr(root, "peft_config", {})
    hft_config = configs.get(adapter_name) if isinstance(configs, dict) else None
    params = ledger.hft_adapters[adapter_name].params
    owners = _owners(root)
    dropped_embeddings = embedding_parameter_names(root) if embeddings == "drop" else set()

    # Which modules hold each diff, and how each module is converted. A module with any diff LoRA cannot express
    # (a bias, a norm) goes whole into modules_to_save, so it is never both a LoRA target and a saved module.
    kind_of: dict[str, str] = {}
    for name in params:
        for module_name, attr, module in owners[name]:
            if name in dropped_embeddings:
                kind = "dropped"
            elif attr == "weight" and isinstance(module, nn.Linear):
                kind = "lora"
            elif attr == "weight" and isinstance(module, nn.Embedding):
                kind = "lora_embedding"
            else:
                kind = "modules_to_save" if others == "modules_to_save" else "dropped"
            if kind_of.get(module_name) in ("modules_to_save", "dropped"):
                continue
            kind_of[module_name] = kind

    report = LoraConversionReport(rank=rank)
    state_dict: dict[str, torch.Tensor] = {}
    targets: list[str] = []
    saved_modules: list[str] = []
    rank_pattern: dict[str, int] = {}
    for name in tqdm(params, desc="HFT -> LoRA", disable=not progressbar):
        base = ledger.original(name)
        diff = ledger.current_value(adapter_name, name).detach().to("cpu").float() - base.to("cpu").float()
        out_dtype = dtype or base.dtype
        norm = float(torch.linalg.vector_norm(diff))
        for module_name, attr, module in owners[name]:
            kind = kind_of[module_name]
            key = PEFT_KEY_PREFIX + module_name
            if kind in ("lora", "lora_embedding"):
                matrix = diff if kind == "lora" else diff.T  # LoRA's embedding delta is (B @ A).T
                a, b, used, error = _factorise(matrix, rank)
                if kind == "lora":
                    state_dict[f"{key}.lora_A.weight"] = a.to(out_dtype).contiguous()
                    state_dict[f"{key}.lora_B.weight"] = b.to(out_dtype).contiguous()
                else:
                    state_dict[f"{key}.lora_embedding_A"] = a.to(out_dtype).contiguous()
                    state_dict[f"{key}.lora_embedding_B"] = b.to(out_dtype).contiguous()
                targets.append(module_name)
                if used != rank:
                    rank_pattern[module_name] = used
                report.tensors.append(
                    TensorReport(module_name + "." + attr, kind, list(diff.shape), used, min(diff.shape), error, norm)
                )
            elif kind == "modules_to_save":
                if module_name not in saved_modules:
                    saved_modules.append(module_name)
                    for param_name, param in module.named_parameters(recurse=False):
                        full = f"{module_name}.{param_name}"
                        value = ledger.current_value(adapter_name, full) if full in params else param.detach()
                        state_dict[f"{key}.{param_name}"] = value.detach().to("cpu", copy=True).contiguous()
                report.tensors.append(TensorReport(f"{module_name}.{attr}", kind, list(diff.shape), 0, 0, 0.0, norm))
            else:
                report.tensors.append(TensorReport(f"{module_name}.{attr}", kind, list(diff.shape), 0, 0, 1.0, norm))
    if not targets and not saved_modules:
        raise ValueError(
            f"Nothing of HFT adapter {adapter_name!r} can be expressed as LoRA (no Linear or Embedding weights among "
            f"its diffs, and others={others!r}). Fix: serve the merged model instead (peft-hft merge)."
        )
    lora_config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=sorted(set(targets)) or None,
        modules_to_save=saved_modules or None,
        rank_pattern=rank_pattern,
        alpha_pattern=dict(rank_pattern),
        task_type=getattr(hft_config, "task_type", None),
        base_model_name_or_path=getattr(hft_config, "base_model_name_or_path", None),
        revision=getattr(hft_config, "revision", None),
    )
    if not targets:  # only modules_to_save; LoraConfig needs some target
        lora_config.target_modules = []
    return lora_config, state_dict, report


def save_as_lora(
    path: Union[str, os.PathLike],
    model: nn.Module,
    rank: int,
    adapter_name: str = "default",
    others: Others = "modules_to_save",
    dtype: Optional[torch.dtype] = None,
    overwrite: bool = False,
    progressbar: bool = False,
    embeddings: Embeddings = "lora",
) -> LoraConversionReport:
    """Convert (see :func:`convert_to_lora`) and save a LoRA adapter directory: ``adapter_config.json``,
    ``adapter_model.safetensors`` and the report ``lora_conversion.json``. Written atomically."""
    lora_config, state_dict, report = convert_to_lora(model, rank, adapter_name, others, dtype, progressbar,
                                                      embeddings)
    with atomic_directory(path, overwrite=overwrite) as staging:
        save_file(state_dict, str(Path(staging) / LORA_WEIGHTS_NAME), metadata={"format": "pt"})
        lora_config.save_pretrained(str(staging))
        (Path(staging) / REPORT_NAME).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report


def _factorise(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """``(A, B, used_rank, relative_error)`` with ``B @ A`` the best rank-``used_rank`` approximation of ``matrix``."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    used = min(rank, s.numel())
    total = float((s.double() ** 2).sum())
    lost = float((s[used:].double() ** 2).sum())
    root = s[:used].sqrt()
    a = root[:, None] * vh[:used]
    b = u[:, :used] * root[None, :]
    return a, b, used, math.sqrt(lost / total) if total > 0 else 0.0


def _owners(root: nn.Module) -> dict[str, list[tuple[str, str, nn.Module]]]:
    """Parameter name (as ``named_parameters`` lists it) -> every ``(module name, attribute, module)`` holding it.

    A tied embedding is one parameter held by the input embedding and the output head.
    """
    canonical = {id(p): n for n, p in root.named_parameters()}
    owners: dict[str, list[tuple[str, str, nn.Module]]] = {}
    for module_name, module in _all_modules(root):
        for attr, param in module.named_parameters(recurse=False):
            name = canonical.get(id(param))
            if name is not None:
                owners.setdefault(name, []).append((module_name, attr, module))
    return owners


def _all_modules(root: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    from ..tuner.layer import HFTLayer

    for name, module in root.named_modules(remove_duplicate=False):
        if not isinstance(module, HFTLayer):
            yield name, module


def adapter_to_lora(
    adapter: Union[str, os.PathLike],
    output: Union[str, os.PathLike],
    rank: int,
    base: Optional[str] = None,
    others: Others = "modules_to_save",
    dtype: Optional[torch.dtype] = None,
    overwrite: bool = False,
    progressbar: bool = True,
    embeddings: Embeddings = "lora",
    verify: bool = True,
) -> LoraConversionReport:
    """Load ``base`` (default: the adapter's ``base_model_name_or_path``) with the HFT adapter, convert, save.

    This is ``peft-hft to-lora``. The base model is loaded on the CPU in its stored dtype; its values are needed for
    the modules saved in full (``modules_to_save``), and its module types decide Linear vs Embedding vs other.
    Every argument (the output path, the adapter's type, the base) is checked before the model is loaded; ``verify``
    checks the base against the adapter's base fingerprint (``--no-verify`` turns it off).
    """
    from peft import PeftModel

    from ..format.fingerprint import skip_base_check
    from ..format.reader import read_adapter

    adapter = str(adapter)
    check_output(output, overwrite, {"ADAPTER": adapter, "--base": base})
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}.")
    config_path = Path(str(adapter)) / ADAPTER_CONFIG  # name a local adapter of another method
    peft_type = str(load_config_json(config_path)["peft_type"]).split(".")[-1] if config_path.is_file() else None
    if peft_type is not None and peft_type != "HFT":
        raise ValueError(
            f"{adapter} is a {peft_type} adapter, not an HFT adapter; to-lora converts HFT adapters"
            + (" (this one is LoRA already)." if peft_type == "LORA" else ".")
        )
    with read_adapter(adapter, load=False, check_values=False) as adapter_file:  # refuses a damaged adapter now
        config = adapter_file.config
    base = base or config.get("base_model_name_or_path")
    if not base:
        raise ValueError(
            f"{adapter}/adapter_config.json names no base model (base_model_name_or_path). Fix: pass --base."
        )
    check_output(output, overwrite, {"base": base})  # the adapter's own base_model_name_or_path, when local
    model = _load_base(str(base))
    with skip_base_check() if not verify else contextlib.nullcontext():
        peft_model = PeftModel.from_pretrained(model, adapter)
    return save_as_lora(output, peft_model, rank, others=others, dtype=dtype, overwrite=overwrite,
                        progressbar=progressbar, embeddings=embeddings)


def _load_base(base: str) -> nn.Module:
    """The base model for :func:`adapter_to_lora`, with an error in one line for a path that is not a model."""
    from transformers import AutoModelForCausalLM

    path = Path(base).expanduser()
    if path.exists() and not (path / "config.json").is_file():
        what = "an adapter directory (it holds adapter_config.json)" if (path / ADAPTER_CONFIG).is_file() else (
            "not a model directory (it holds no config.json)"
        )
        raise ValueError(f"The base {base} is {what}. Fix: pass the base model's directory or Hub id as --base.")
    if not path.exists() and not is_repo_id(base):
        raise FileNotFoundError(
            f"The base {base} does not exist. Fix: pass the base model's directory or Hub id as --base."
        )
    try:
        return AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"Cannot load the base model {base}: {first} Fix: pass --base DIR (a local model).") from exc
