"""The alpha dial: an HFT adapter whose diffs are ``alpha`` times another's (``peft-hft scale IN OUT --alpha A``).

An HFT adapter stores ``tuned - base`` for the tensors it trained, so ``base + alpha * diff`` is exact task
arithmetic: alpha 0 is the base, 1 the fine-tuned model, values in between trade what was learned against what was
forgotten without retraining (docs/forgetting.md measures that trade), values above 1 extrapolate, -1 negates the task.
In memory the same model is ``add_weighted_adapter([name], [alpha], ...)``; this operation writes it as an adapter of
its own, tensor by tensor, from the tensors the strict reader decodes.

Rounding, exactly: each scaled diff is ``(alpha * diff.float()).to(dtype)``, one rounding of the float32 product.
``dtype`` is each input diff's own dtype by default (the file keeps its size), or ``diff_dtype``.

* float32 diffs (the default of HFT adapters: fp32 models, and bf16 models with fp32 master weights): the product is
  exact to float32 rounding, and a bf16 base loads ``(base.float() + alpha * diff).to(bfloat16)``, exactly what
  ``add_weighted_adapter`` computes.
* bfloat16 diffs: ``alpha * diff`` is rounded to bfloat16 once more (relative error at most 2^-8, half a bf16 ulp,
  per element; none when alpha is a power of two, e.g. 0.25 or 0.5, unless the product underflows), and the bf16
  model then rounds ``base + scaled diff`` as always. Pass ``diff_dtype="float32"`` to keep the product unrounded
  (twice the file size): the loaded model is then ``(base.float() + alpha * diff.float()).to(bfloat16)`` of the
  file's diffs, bit for bit.
  (``add_weighted_adapter`` on a model that loaded a bf16-diff adapter starts from the diff of the loaded bf16
  weights, which is one bf16 ulp off the file's diff in a few elements, docs/concepts.md; its result can differ from
  this one in those elements.)

The output keeps the input's selection and base fingerprint (it belongs to the same base) and records the scaling in
``adapter_config.json`` under ``"scaling"``: ``{"alpha": total factor relative to the original fine-tune, "steps":
[{"alpha": ..., "source": ...}, ...]}`` (scaling a scaled adapter multiplies the factors).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from ..format.checkpoint import Checkpoint, PathLike, SafetensorsWriter
from ..format.keys import ADAPTER_CONFIG, ADAPTER_WEIGHTS, diff_key
from ..format.reader import read_adapter
from ..integrations.hub import update_model_card
from ..tuner.model import config_from_dict
from ..utils import atomic_directory, float_dtype, listing
from .compress import base_tensor

SCALING_KEY = "scaling"


@dataclass(frozen=True)
class ScaleResult:
    output: Path
    alpha: float  # this operation's factor
    total_alpha: float  # relative to the original fine-tune (the product over every scaling of the chain)
    tensors: int
    bytes_written: int


def scale_diff(diff: torch.Tensor, alpha: float, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``(alpha * diff.float()).to(dtype or diff.dtype)``: one diff scaled, with one rounding (module docstring)."""
    return (diff.float() * alpha).to(dtype or diff.dtype)


def scale_adapter(
    adapter: PathLike,
    output: PathLike,
    alpha: float,
    *,
    diff_dtype: Optional[str] = None,
    overwrite: bool = False,
    progress: bool = True,
    revision: Optional[str] = None,
    base: Optional[PathLike] = None,
    base_revision: Optional[str] = None,
) -> ScaleResult:
    """Write the HFT adapter ``base + alpha * (adapter's diff)`` to ``output`` (see the module docstring).

    Args:
        adapter: Directory (or Hub repo id) of an HFT adapter; read and validated by the strict reader.
        output: Adapter directory to create; it appears only when complete.
        alpha: The factor (any finite number).
        diff_dtype: Dtype of the scaled diffs (default: each input diff's dtype); ``"float32"`` keeps the product
            unrounded for bf16 diffs.
        overwrite: Replace ``output`` if it exists (once the new one is complete).
        base: The base checkpoint, needed when the adapter stores ``diff_encoding="exact"`` (steps counted from the
            base values: the default for bf16/fp16 models). Every encoding is decoded to its diffs first; the output
            stores plain (``"float"``) diffs, in ``diff_dtype`` or the decoded dtype (float32 for encoded inputs).
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}.")
    alpha = float(alpha)
    dtype = float_dtype(diff_dtype, "diff_dtype")
    with read_adapter(adapter, revision=revision, load=False) as source:
        if source.full:
            raise ValueError(
                f"The adapter {source.source.name} holds tuned tensors in full ({listing(sorted(source.full))}), saved "
                "because the vocabulary was extended before training; their base values are not in the adapter, so "
                "they cannot be scaled. Fix: scale in memory with add_weighted_adapter([name], [alpha], "
                "adapter_name=...) on the loaded model, then save_pretrained."
            )
        if source.encoding.kind == "exact" and base is None:
            raise ValueError(
                f"The adapter {source.source.name} stores its update as exact steps from the base model's values "
                "(diff_encoding 'exact'), so scaling it needs the base. Fix: pass the base checkpoint (--base DIR, "
                "the model the adapter was trained on)."
            )
        checkpoint = Checkpoint.open(base, base_revision) if base is not None else None
        config = json.loads(json.dumps(source.config))
        config["diff_encoding"] = "float"
        previous = config.get(SCALING_KEY) or {}
        total = alpha * float(previous.get("alpha", 1.0))
        config[SCALING_KEY] = {
            "alpha": total,
            "steps": [*previous.get("steps", []), {"alpha": alpha, "source": source.source.name}],
        }
        if dtype is not None:
            config["diff_dtype"] = diff_dtype
        names = list(source.diffs)
        encoded = source.encoding.kind != "float"
        layout = [(diff_key(n), dtype or (torch.float32 if encoded else source.entries[source.diffs[n]].dtype),
                   source.shape_of(n)) for n in names]
        written = 0
        inputs = {"ADAPTER directory": source.directory}
        if checkpoint is not None:
            inputs["BASE directory"] = checkpoint.source.directory
        with atomic_directory(output, overwrite=overwrite, inputs=inputs) as staging:
            with SafetensorsWriter(staging / ADAPTER_WEIGHTS, layout, {"format": "pt"}) as writer:
                by_key = {diff_key(n): n for n in names}
                for key in tqdm(writer.order, desc=f"Scaling by {alpha:g}", disable=not progress):
                    name = by_key[key]
                    diff = source.diff(name, base_tensor(source, checkpoint, name), check=True)
                    scaled = scale_diff(diff, alpha, dtype or (torch.float32 if encoded else diff.dtype))
                    writer.write(key, scaled.contiguous())
                    written += scaled.numel() * scaled.element_size()
            (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            readme = source.directory / "README.md"
            if readme.is_file():
                (staging / "README.md").write_text(readme.read_text(encoding="utf-8"), encoding="utf-8")
            update_model_card(
                staging, {"default": config_from_dict(config)}, base_model=config.get("base_model_name_or_path"),
                sizes={"default": written},
                provenance=f"Made with `peft-hft scale` from `{source.source.name}`: its diffs times {alpha:g} "
                f"(base + {total:g} x the original fine-tune's diff).",
            )
    return ScaleResult(Path(output).expanduser().absolute(), alpha, total, len(names), written)
