"""Importance scores that choose *which* tensors HFT trains, and the calibration pass that computes them.

The paper draws HFT's half at random and lists the "selection bias of the random choice" as its limitation. Newer
work ranks tensors instead: Spectrum (arXiv 2406.06623) by the signal-to-noise ratio of their singular values, SSU
(arXiv 2512.04844) by Wanda-style importance ``|W| * ||X||`` on general text, and the classic alternative is the
diagonal Fisher information. This module computes one score per selectable unit (see ``selection.Unit``) and
:func:`calibrate` turns the scores into an ordinary :class:`HFTConfig` with ``selected_parameters`` filled: the
structure (``ratio`` of the attention, feed-forward and norm tensors of every block, with the same floor/ceil
alternation as the random draw) stays the paper's, only the choice *within* each block's category follows the score.
The adapters trained from such a config are plain HFT adapters.

Strategies (``STRATEGIES``), what they measure, and which end of the ranking is trained:

* ``"snr"`` (data-free, Spectrum): per matrix, the sum of the singular values above the Marchenko-Pastur edge of a
  noise level estimated from their inter-quartile range, over the sum of those below it (scale-free; see
  :func:`spectral_snr`). The highest-SNR tensors train (Spectrum's rule). Vectors (norm weights) have no spectrum:
  they are drawn at random within the structure.
* ``"wanda"`` (old knowledge, general text): per tensor, the mean over its elements of ``|W_ij| * ||X_j||``, with
  ``||X_j||`` the L2 norm of input feature ``j`` over every calibration token (norm weights: the L2 norm of each output
  feature, which is ``|gamma_j| * ||x_hat_j||``). The *least* important tensors train: old knowledge needs them least.
* ``"fisher"`` (old knowledge, general text): per tensor, the mean squared gradient of the language-model loss
  per element (the diagonal empirical Fisher information, averaged). The least important tensors train.
* ``"gradient"`` (new task, the task's own data): the same mean squared gradient, on the new task's batches; the
  *most* important tensors train: what the task needs most.

Memory is bounded by design: activation statistics are per-feature running sums updated by forward hooks (one
vector of ``in_features`` floats per matrix; no activation is kept), and gradient statistics are one running scalar
per tensor, accumulated by post-accumulate-grad hooks that free each gradient as soon as it is read (the model never
holds more than the gradients of the tensors being back-propagated at that moment, and none of the embeddings).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import HFTConfig
from .selection import EMBEDDING, FINAL_NORM, LM_HEAD, ModelLayout, Unit, analyze_model, resolve_selection

# strategy -> (does it need data, which end trains, what it measures)
STRATEGIES: dict[str, tuple[bool, str, str]] = {
    "snr": (False, "high", "spectral signal-to-noise ratio of the weights (Spectrum); data-free"),
    "wanda": (True, "low", "|W| x input-activation norm on general text (Wanda/SSU); least important trains"),
    "fisher": (True, "low", "mean squared LM-loss gradient on general text (diagonal Fisher); least important trains"),
    "gradient": (True, "high", "mean squared loss gradient on the new task's data; most important trains"),
}
# Structures under which a ranking is meaningful: every block's categories (paper), parameter-balanced, model-wide.
RANKED_STRUCTURES = ("category", "param_count", "model")
CALIBRATION_FORMAT = 1


def scored_units(layout: ModelLayout) -> list[Unit]:
    """The units a strategy ranks: every unit the selection draws (block units and other units outside the blocks);
    embeddings, ``lm_head`` and the final norm are trained by ``train_embeddings`` regardless of any score."""
    return [u for u in layout.units if u.category not in (EMBEDDING, LM_HEAD, FINAL_NORM)]


# --------------------------------------------------------------------------------------------------------------------
# Data-free: spectral SNR
# --------------------------------------------------------------------------------------------------------------------


def spectral_snr(weight: torch.Tensor) -> Optional[float]:
    """Spectrum's SNR of a matrix (mean over the matrices of a 3-D stack, e.g. MoE experts); None for vectors.

    Singular values above ``sigma * (1 + sqrt(beta))`` count as signal, with ``sigma = IQR(S) / 1.349`` and ``beta``
    the matrix's aspect ratio (short side over long side); the score is signal / noise. Spectrum also divides by the
    largest singular value, which makes the score scale with 1 / the matrix's scale (weights times 0.02 score 50 times
    higher): harmless when it compares one tensor type across layers, as Spectrum does, but meaningless when it
    compares q with o inside a block, as HFT's structure does, so that division is left out.
    """
    if weight.dim() < 2:
        return None
    matrices = weight.detach().float().reshape(-1, *weight.shape[-2:])
    values = []
    for matrix in matrices:
        s = torch.linalg.svdvals(matrix)
        rows, cols = matrix.shape
        beta = min(rows, cols) / max(rows, cols)
        sigma = (torch.quantile(s, 0.75) - torch.quantile(s, 0.25)) / 1.349
        signal_mask = s > sigma * (1 + math.sqrt(beta))
        signal = s[signal_mask].sum()
        noise = s[~signal_mask].sum() if (~signal_mask).any() else s.new_tensor(1.0)
        values.append(float(signal / noise) if s[0] > 0 else 0.0)
    return sum(values) / len(values)


# --------------------------------------------------------------------------------------------------------------------
# Activation statistics (Wanda)
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class FeatureNorms:
    """Running sum of squares per feature of one module's input (matrices) or output (norm weights)."""

    sum_squares: torch.Tensor  # fp32, one entry per feature
    on_output: bool

    def numel(self) -> int:
        return self.sum_squares.numel()


def _input_axis(module: nn.Module, weight: torch.Tensor, features: int) -> Optional[int]:
    """Which axis of ``weight`` multiplies the input's last dimension: 1 for ``nn.Linear`` (out, in), 0 for GPT-2's
    ``Conv1D`` (in, out); None when it cannot be told (the unit is then drawn at random)."""
    if weight.dim() != 2:
        return None
    if isinstance(module, nn.Linear):
        return 1
    if type(module).__name__ == "Conv1D":
        return 0
    matches = [axis for axis in (1, 0) if weight.shape[axis] == features]
    return matches[0] if len(matches) == 1 else None


class _Recorder:
    """Forward hooks that add each calibration token's squared activations to per-feature sums (padding masked)."""

    def __init__(self, model: nn.Module, units: list[Unit]):
        self.stats: dict[str, FeatureNorms] = {}
        self.mask: Optional[torch.Tensor] = None
        self.tokens = 0
        self._modules = dict(model.named_modules())
        self._units = units

    def _add(self, key: str, x: torch.Tensor, on_output: bool) -> None:
        if not torch.is_tensor(x) or not x.is_floating_point():
            return
        x = x.detach().float()
        if self.mask is not None and x.shape[:-1] == self.mask.shape:
            x = x * self.mask.unsqueeze(-1).to(x)
        squares = x.pow(2).reshape(-1, x.shape[-1]).sum(0)
        record = self.stats.get(key)
        if record is None:
            self.stats[key] = FeatureNorms(squares, on_output)
        elif record.sum_squares.shape == squares.shape:
            record.sum_squares += squares

    def hooks(self, stack: ExitStack) -> None:
        for unit in self._units:
            module_name, _, param = unit.name.rpartition(".")
            module = self._modules.get(module_name)
            if module is None or param != "weight":
                continue
            weight = module.weight
            if weight.dim() == 1:  # norm weights scale the output feature-wise
                handle = module.register_forward_hook(
                    lambda _m, _a, out, key=unit.name: self._add(key, out[0] if isinstance(out, tuple) else out, True)
                )
            else:
                handle = module.register_forward_pre_hook(
                    lambda _m, args, key=unit.name: self._add(key, args[0], False) if args else None
                )
            stack.callback(handle.remove)

    def scores(self) -> dict[str, float]:
        out = {}
        for unit in self._units:
            record = self.stats.get(unit.name)
            if record is None:
                continue
            module_name = unit.name.rpartition(".")[0]
            module = self._modules[module_name]
            weight = module.weight.detach().float()
            norms = record.sum_squares.sqrt()
            if record.on_output:
                out[unit.name] = float(norms.mean()) if norms.numel() == weight.numel() else None
                continue
            axis = _input_axis(module, weight, norms.numel())
            if axis is None or weight.shape[axis] != norms.numel():
                continue
            # mean_ij |W_ij| * ||X_j||, computed without materialising the product
            scale = norms.unsqueeze(0) if axis == 1 else norms.unsqueeze(1)
            out[unit.name] = float((weight.abs() * scale).mean())
        return {k: v for k, v in out.items() if v is not None}


# --------------------------------------------------------------------------------------------------------------------
# Gradient statistics (Fisher, new-task gradient)
# --------------------------------------------------------------------------------------------------------------------


class _GradientMeter:
    """Running sum of squared gradients per unit, read and freed by post-accumulate-grad hooks."""

    def __init__(self, model: nn.Module, units: list[Unit]):
        self.params = dict(model.named_parameters())
        self.units = [u for u in units if self.params[u.name].is_floating_point()]
        self.sums: dict[str, float] = {u.name: 0.0 for u in self.units}
        self.peak_live_gradients = 0  # most gradients of the model alive at once (bounded memory: 1)

    def hooks(self, model: nn.Module, stack: ExitStack) -> None:
        flags = {name: p.requires_grad for name, p in model.named_parameters()}
        stack.callback(lambda: [p.requires_grad_(flags[n]) for n, p in model.named_parameters()])
        wanted = {u.name for u in self.units}
        for name, param in model.named_parameters():
            param.requires_grad_(name in wanted)
            if param.grad is not None:
                raise ValueError(
                    f"{name} already holds a gradient; calibrate() measures gradients of its own. Call "
                    "model.zero_grad(set_to_none=True) first."
                )
        for unit in self.units:
            stack.callback(self.params[unit.name].register_post_accumulate_grad_hook(self._read(unit.name)).remove)

    def _read(self, name: str):
        def hook(param: torch.Tensor) -> None:
            live = sum(p.grad is not None for p in self.params.values())
            self.peak_live_gradients = max(self.peak_live_gradients, live)
            self.sums[name] += float(param.grad.detach().float().pow(2).sum())
            param.grad = None

        return hook

    def scores(self, batches: int) -> dict[str, float]:
        return {u.name: self.sums[u.name] / (self.params[u.name].numel() * max(1, batches)) for u in self.units}


def _labels_for(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The batch's labels, or next-token labels on every non-padding token when it has none."""
    if "labels" in batch:
        return batch["labels"]
    labels = batch["input_ids"].clone()
    if "attention_mask" in batch:
        labels[batch["attention_mask"] == 0] = -100
    return labels


# --------------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------------


def _check_model(model: nn.Module) -> None:
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    if isinstance(model, (PeftModel, BaseTuner)):
        raise TypeError(
            "calibrate() and importance_scores() take the base model, before get_peft_model(): the selection they "
            "return names the base model's parameters. Fix: score the base model, then call "
            "get_peft_model(base, config)."
        )


def _check_strategy(strategy: str, dataloader: Any) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(
            f"Unknown importance strategy {strategy!r}; choose one of {', '.join(map(repr, STRATEGIES))} (or use "
            "HFTConfig(strategy='category') for the paper's random draw)."
        )
    if STRATEGIES[strategy][0] and dataloader is None:
        data = "the new task's training batches" if strategy == "gradient" else "batches of general text"
        raise ValueError(f"strategy={strategy!r} needs calibration data: pass a dataloader of {data}.")


def _batches(dataloader: Iterable, max_batches: Optional[int]) -> Iterable:
    for i, batch in enumerate(dataloader):
        if max_batches is not None and i >= max_batches:
            return
        yield batch


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise ValueError(
            "Calibration batches must be dicts with 'input_ids' (and optionally 'attention_mask' and 'labels'), as a "
            f"transformers DataCollator produces; got {type(batch).__name__}."
        )
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@dataclass
class Calibration:
    """What a calibration pass measured: a score per unit and how much data it saw."""

    strategy: str
    scores: dict[str, float]  # unit name (its main parameter) -> score; units without one are drawn at random
    batches: int
    tokens: int
    statistics_numel: int = 0  # floats of running statistics kept (independent of the amount of data)
    peak_live_gradients: int = 0  # most parameter gradients alive at once (gradient strategies)


def importance_scores(
    model: nn.Module,
    dataloader: Optional[Iterable] = None,
    strategy: str = "wanda",
    max_batches: Optional[int] = None,
    layers_pattern: Optional[str] = None,
    progress: bool = True,
) -> Calibration:
    """Score every unit the selection draws from (see :data:`STRATEGIES` for what each strategy measures).

    Args:
        model: The base model (not wrapped by PEFT). It is left unchanged: training mode, ``requires_grad`` flags and
            gradients are restored.
        dataloader: Batches (dicts with ``input_ids``, optionally ``attention_mask`` and ``labels``). Not needed for
            ``"snr"``. Without ``labels``, gradient strategies use the next-token loss on every non-padding token.
        strategy: ``"snr"``, ``"wanda"``, ``"fisher"`` or ``"gradient"``.
        max_batches: Stop after this many batches (None: the whole dataloader).
        layers_pattern: As in :class:`HFTConfig`, for models whose blocks are not found automatically.
        progress: Show a progress bar.

    Returns:
        A :class:`Calibration` with one score per unit (higher = more important) and the amount of data seen.
    """
    _check_model(model)
    _check_strategy(strategy, dataloader)
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise ValueError(
            f"max_batches must be a positive int (the number of calibration batches to use) or None for the whole "
            f"dataloader, got {max_batches!r}."
        )
    layout = analyze_model(model, layers_pattern)
    units = scored_units(layout)
    params = dict(model.named_parameters())
    if strategy == "snr":
        scores = {}
        for unit in tqdm(units, desc="spectral SNR", disable=not progress):
            value = spectral_snr(params[unit.name])
            if value is not None:
                scores[unit.name] = value
        return Calibration(strategy, scores, 0, 0)

    device = next(model.parameters()).device
    was_training = model.training
    batches = tokens = 0
    with ExitStack() as stack:
        stack.callback(model.train, was_training)
        model.eval()  # no dropout: the scores depend on the data only
        if strategy == "wanda":
            meter: Any = _Recorder(model, units)
            meter.hooks(stack)
            stack.enter_context(torch.no_grad())
        else:
            meter = _GradientMeter(model, units)
            meter.hooks(model, stack)
        total = len(dataloader) if hasattr(dataloader, "__len__") else None
        if max_batches is not None:
            total = max_batches if total is None else min(total, max_batches)
        for batch in tqdm(_batches(dataloader, max_batches), desc=f"calibration ({strategy})", disable=not progress,
                          total=total):
            batch = _to_device(batch, device)
            mask = batch.get("attention_mask")
            tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
            if strategy == "wanda":
                meter.mask = mask
                model(**{k: v for k, v in batch.items() if k != "labels"})
            else:
                loss = model(**{**batch, "labels": _labels_for(batch)}).loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"The calibration loss is {loss.item()} on batch {batches}.")
                loss.backward()
            batches += 1
    if batches == 0:
        raise ValueError("The calibration dataloader yielded no batch; give it at least one.")
    if tokens == 0:
        warnings.warn(
            f"The calibration saw 0 tokens in {batches} batch(es): every attention_mask entry is 0 (only padding), so "
            f"the {strategy!r} scores carry no information and the selection is the seeded random draw. Fix: check "
            "the dataloader's attention_mask (padding side, empty texts).",
            stacklevel=3,
        )
    if strategy == "wanda":
        numel = sum(record.numel() for record in meter.stats.values())
        return Calibration(strategy, meter.scores(), batches, tokens, statistics_numel=numel)
    return Calibration(strategy, meter.scores(batches), batches, tokens, statistics_numel=len(meter.sums),
                       peak_live_gradients=meter.peak_live_gradients)


def calibrate(
    model: nn.Module,
    dataloader: Optional[Iterable] = None,
    strategy: str = "wanda",
    ratio: Optional[float] = None,
    config: Optional[HFTConfig] = None,
    max_batches: Optional[int] = None,
    progress: bool = True,
    **config_kwargs: Any,
) -> HFTConfig:
    """An :class:`HFTConfig` whose selection is chosen by an importance score instead of at random.

    The structure is ``config.strategy``'s (default ``"category"``: in every block, ``ratio`` of the attention,
    feed-forward and norm tensors, the paper's shares); within it, the tensors are picked by ``strategy``'s score
    (see :data:`STRATEGIES`; ties and unscored tensors fall back to the seeded random draw). The result has
    ``selected_parameters`` filled and records the strategy and the calibration settings in ``calibration`` (saved in
    ``adapter_config.json``)::

        config = peft_hft.calibrate(base, general_text_loader, strategy="wanda", ratio=0.5, max_batches=16)
        model = get_peft_model(base, config)

    Args:
        model: The base model, before ``get_peft_model``; it is left unchanged.
        dataloader: Calibration batches (see :func:`importance_scores`); not needed for ``"snr"``.
        strategy: ``"snr"``, ``"wanda"``, ``"fisher"`` or ``"gradient"``.
        ratio: Share of tensors to train (overrides ``config.ratio``).
        config: A template config (ratio, seed, target/exclude modules, ...); its ``selected_parameters`` must be
            unset. Default: ``HFTConfig(**config_kwargs)``.
        max_batches: Stop the calibration after this many batches.
        progress: Show progress bars.
        config_kwargs: Fields of the new ``HFTConfig`` when ``config`` is not given.
    """
    if config is not None and config_kwargs:
        raise ValueError("Pass either config=HFTConfig(...) or HFTConfig fields as keywords, not both.")
    template = copy.deepcopy(config) if config is not None else HFTConfig(**config_kwargs)
    if template.selected_parameters is not None:
        raise ValueError(
            "The template config already has selected_parameters (a resolved selection); calibrate() chooses them. "
            "Pass a config without selected_parameters."
        )
    if template.strategy not in RANKED_STRUCTURES:
        raise ValueError(
            f"calibrate() ranks tensors within the structure of strategy 'category', 'param_count' or 'model'; "
            f"got HFTConfig(strategy={template.strategy!r}). Use one of those."
        )
    if ratio is not None:
        template = dataclasses.replace(template, ratio=ratio)  # validated again
    result = importance_scores(model, dataloader, strategy, max_batches, template.layers_pattern, progress)
    prefer = STRATEGIES[strategy][1]
    rank = result.scores if prefer == "high" else {k: -v for k, v in result.scores.items()}
    selected = resolve_selection(model, template, rank=rank)
    return dataclasses.replace(template, selected_parameters=selected, calibration={
        "format": CALIBRATION_FORMAT,
        "strategy": strategy,
        "trains": "most important" if prefer == "high" else "least important",
        "structure": template.strategy,
        "batches": result.batches,
        "tokens": result.tokens,
        "max_batches": max_batches,
        "scored_tensors": len(result.scores),
    })
