"""Peak training memory of one step, by component, for FFT, LoRA, plain freezing and HFT in each memory option
(``peft-hft estimate-memory MODEL``, :func:`peft_hft.estimate_memory`), without loading any weights.

accelerate's ``estimate-memory`` counts the weights only; what decides whether a model trains on a GPU is the peak of
a *step*: weights, the masters (or their replacement), gradients, optimizer state, activations, and the temporaries
of the optimizer step. They are not all alive at once: activations peak late in the forward pass and shrink during
backward while gradients grow; the step needs every gradient but no activation. The estimate follows that timeline:

* **Forward and backward are run, not modelled.** The model is built from ``config.json`` on the meta device
  (``format.checkpoint.meta_model``: no memory, no weights), its trainable tensors are the method's real ones (the
  HFT selection drawn by :func:`~peft_hft.tuner.selection.resolve_selection`, tied embeddings included; PEFT's LoRA
  layers), and one forward and backward pass on meta tensors runs under a dispatch mode that counts the bytes of
  every tensor alive after each operation. What autograd saves (which depends on what is trained: a frozen linear
  layer saves no input for a weight gradient), gradient checkpointing's recomputation, the fp32 logits of the loss
  and gradients that appear during backward are therefore exact for the architecture at hand. Attention is counted
  as the fused kernels run it (``scaled_dot_product_attention`` without a mask: flash attention on CUDA, its CPU
  version on the CPU; no ``seq x seq`` matrix is kept), which is what transformers' ``sdpa`` path calls for full,
  unpadded sequences.
* **Persistent state is counted from the parameters:** weights (frozen ones quantized where asked), the masters
  (:data:`MASTER_WEIGHTS`), the optimizer state (:data:`OPTIMIZERS`, read off torch's and torchao's sources), and the
  step's temporaries (the fp32 gradient copies HFT's fp32 masters hand the optimizer; torchao's per-tensor
  dequantized moments).

Peak = weights + masters + optimizer state + max(peak of activations and gradients during forward/backward,
all gradients + the step's temporaries). With the step fused into backward, each tensor is stepped as its gradient
completes: the meta run does the same through ``register_post_accumulate_grad_hook``, counting that tensor's step
temporaries at that moment and dropping its gradient after, so the peak is the largest sum of activations, live
gradients and one tensor's temporaries that really occurs (lm_head, the largest tensor of an LLM, steps at the start
of backward, while the loss's logits are alive; the embedding steps last, when the activations are gone). HFT's
originals (the base values of the trained half, for diffs and ``disable_adapter``) live in host memory by default and
are reported apart (``host_bytes``), as are the masters and optimizer state that ``master_weights="fp32_offload"``
keeps in host memory (``offloaded_bytes``, part of ``host_bytes``). Memory the allocator holds but does not use
(CUDA's caching allocator, fragmentation) is not included; on CUDA budget about 5-10% above ``total_bytes``.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from tqdm.auto import tqdm

from ..format.checkpoint import meta_model
from ..tuner import precision
from ..tuner.config import HFTConfig
from ..tuner.precision import is_low_precision
from ..tuner.quantize_frozen import nf4_bytes, quantizable_weights
from ..tuner.selection import resolve_selection
from ..utils import torch_dtype

GiB = 2**30

# ------------------------------------------------------------------------------------------------------------------
# What each option costs, per trained tensor (the definitions; the estimate only adds them up)
# ------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MasterCost:
    """Bytes an ``HFTConfig(master_weights=...)`` option keeps per trained low-precision element.

    ``state_bytes``: persistent (fp32 master 4, Kahan compensation buffer in bf16 2, stochastic rounding 0).
    ``step_copy_bytes``: alive while the tensor is stepped (``tuner/precision.py``'s pre-step hook hands the
    optimizer an fp32 copy of its gradient while the bf16 gradient is kept, and for Kahan and stochastic rounding
    also the tensor's exact value built in fp32: 4 + 4; fp32 masters step the master itself: 4).
    ``optimizer_sees_fp32``: the optimizer steps an fp32 tensor, so its unquantized state is fp32; otherwise the state
    takes the parameter's dtype (``torch.zeros_like(param)`` in torch's and torchao's AdamW).
    ``weight_freed_in_step``: during the step the parameter holds the master (``param.data = master``), so its
    low-precision weight is freed and written anew afterwards.
    ``write_back_scratch_bytes``: scratch per element of one piece of the post-step write-back, which goes piece by
    piece (``precision.WRITE_BACK_CHUNK`` elements; see :func:`_one_tensor_scratch`). Kahan on bf16: the weight's
    pattern shifted up into int32, then the rest of the fp32 pattern in place (``split_exact_into``: 4; on fp16
    ``exact - weight`` takes 8, at most 4 MiB more); stochastic rounding: the int32 random bits the value is added
    to in place and then masked to their exponent, and the overflow mask (4 + 1); Kahan in 1 byte: the rest of the
    pattern as for Kahan and the int32 random bits added to it (4 + 4); fp32 masters: none.
    ``on_host``: the master, the optimizer state created beside it and the step's copies live in host memory
    (``"fp32_offload"``): the accelerator keeps the weight and gradient only (the weight is freed while the host
    steps its master and written anew after).
    """

    state_bytes: int
    step_copy_bytes: int
    optimizer_sees_fp32: bool
    weight_freed_in_step: bool = False
    write_back_scratch_bytes: int = 0
    on_host: bool = False


MASTER_WEIGHTS: dict[str, MasterCost] = {
    "fp32": MasterCost(4, 4, True, weight_freed_in_step=True),
    "fp32_offload": MasterCost(4, 4, True, weight_freed_in_step=True, on_host=True),
    "kahan": MasterCost(2, 8, True, weight_freed_in_step=True, write_back_scratch_bytes=4),
    "kahan8": MasterCost(1, 8, True, weight_freed_in_step=True, write_back_scratch_bytes=8),
    "stochastic_rounding": MasterCost(0, 8, True, weight_freed_in_step=True, write_back_scratch_bytes=5),
    "none": MasterCost(0, 0, False),
}


@dataclass(frozen=True)
class OptimizerCost:
    """Optimizer state per trained tensor, as the implementation allocates it.

    ``bytes_per_element`` for each of the ``moments`` quantized states plus one fp32 scale per ``block_size``
    elements and a ``qmap`` lookup table per state; tensors smaller than ``min_numel`` or not divisible by the block
    size keep unquantized states (``torch.zeros_like``), as torchao does (``torchao/optim/adam.py:_new_buffer``).
    ``step_temporary_bytes``: scratch per element of the tensor being stepped, measured (``python
    benchmarks/memory.py --optimizer-scratch``: torchao's compiled per-tensor step on one 16M-element tensor, fp32 or
    bf16 alike, on the CPU): 8 for ``AdamW8bit`` (its two moments dequantized to fp32, as its source reads), 26 for
    ``AdamW4bit`` (the 4-bit codes are unpacked besides); torch's fused AdamW needs none. Not measured on CUDA yet
    (``benchmarks/gpu_check_memory.sh`` runs the same measurement there).
    """

    moments: int
    bytes_per_element: Optional[float]  # None: unquantized
    block_size: int = 0
    qmap_entries: int = 0
    min_numel: int = 0
    step_temporary_bytes: int = 0

    def state_bytes(self, numel: int, unquantized_element_size: int) -> int:
        quantized = (
            self.bytes_per_element is not None and numel >= self.min_numel and numel % self.block_size == 0
        )
        if not quantized:
            return self.moments * numel * unquantized_element_size
        per_state = math.ceil(numel * self.bytes_per_element) + 4 * (numel // self.block_size) + 4 * self.qmap_entries
        return self.moments * per_state


OPTIMIZERS: dict[str, OptimizerCost] = {
    # torch.optim.AdamW(fused=True), transformers' default optim "adamw_torch_fused": exp_avg, exp_avg_sq
    "adamw": OptimizerCost(2, None),
    # torchao.optim.AdamW8bit: uint8 codes, block_size=256 fp32 scales, 256-entry fp32 qmap, tensors >= 4096
    "adamw8bit": OptimizerCost(2, 1.0, 256, 256, 4096, 8),
    # torchao.optim.AdamW4bit: two 4-bit codes per uint8, block_size=128 fp32 scales, 16-entry qmap, tensors >= 4096
    "adamw4bit": OptimizerCost(2, 0.5, 128, 16, 4096, 26),
}

# Formats the frozen block matrices can be held in for training (tuner/quantize_frozen.py): bytes of a tensor.
FROZEN_QUANTIZATION = {"nf4": nf4_bytes}


@dataclass(frozen=True)
class TrainingRecipe:
    """How one method trains: what is trained and which memory options it uses."""

    trained: str  # "all" (FFT), "hft" (the HFT selection, trained in place), "lora"
    master_weights: str = "none"
    optimizer: str = "adamw"
    step_in_backward: bool = False
    chunk_elements: Optional[int] = None  # with step_in_backward: larger tensors stepped in slices of this size
    gradient_checkpointing: Optional[bool] = None  # None: as asked for the whole estimate
    quantize_frozen: Optional[str] = None
    description: str = ""


def low_memory_recipe(offload: bool = False) -> TrainingRecipe:
    """The recipe of :func:`peft_hft.low_memory_preset` (its one definition), as the estimator models it."""
    from ..integrations.low_memory import FP32_MOMENT_BITS, low_memory_preset

    preset = low_memory_preset(offload=offload)
    bits = preset["optimizer"]["bits"]
    optimizer = "adamw" if bits == FP32_MOMENT_BITS else f"adamw{bits}bit"
    master = preset["hft_config"]["master_weights"]
    call = "low_memory_preset(offload=True)" if offload else "low_memory_preset()"
    return TrainingRecipe(
        "hft", master, optimizer, step_in_backward=preset["optimizer_in_backward"],
        chunk_elements=preset["chunk_elements"],
        gradient_checkpointing=preset["training_arguments"]["gradient_checkpointing"],
        description=f"HFT low-memory preset (peft_hft.{call}): {master} masters, {preset['optimizer']['class']}, "
        + (f"step in backward in slices of {preset['chunk_elements']:,} elements" if preset["optimizer_in_backward"]
           else "step after backward")
        + ", gradient checkpointing",
    )


def default_recipes(lora_rank: int = 16) -> dict[str, TrainingRecipe]:
    """The methods ``estimate-memory`` compares, by name (``hft-<option>`` changes one option of default HFT)."""
    master = HFTConfig().master_weights
    hft = TrainingRecipe("hft", master, description=f"HFT, default HFTConfig() ({master} masters, AdamW)")
    recipes = {
        "fft": TrainingRecipe("all", "fp32", description="full fine-tuning, fp32 masters, AdamW"),
        "lora": TrainingRecipe("lora", "none",
                               description=f"LoRA r{lora_rank}, all linear layers, fp32 adapter, AdamW"),
        "freeze": TrainingRecipe("hft", "none", description="plain freezing of the tensors HFT freezes, no masters"),
        "hft": hft,
    }
    for option in MASTER_WEIGHTS:  # every option by its name, the default's too (names do not move with it)
        name = "hft-" + ("no-masters" if option == "none" else option.replace("_", "-"))
        recipes[name] = replace(hft, master_weights=option, description=f"HFT, master_weights={option!r}")
    for optimizer in OPTIMIZERS:
        if optimizer != "adamw":
            recipes[f"hft-{optimizer}"] = replace(hft, optimizer=optimizer, description=f"HFT, torchao {optimizer}")
    recipes["hft-step-in-backward"] = replace(hft, step_in_backward=True, description="HFT, optimizer step in backward")
    for scheme in FROZEN_QUANTIZATION:
        recipes[f"hft-{scheme}-frozen"] = replace(
            hft, quantize_frozen=scheme, description=f"HFT, frozen block matrices in {scheme} (quantize_frozen)"
        )
    recipes["hft-low-memory"] = low_memory_recipe()
    recipes["hft-low-memory-offload"] = low_memory_recipe(offload=True)
    return recipes


# ------------------------------------------------------------------------------------------------------------------
# The result
# ------------------------------------------------------------------------------------------------------------------

COMPONENTS = ("weights", "masters", "optimizer_state", "gradients", "activations", "step_temporaries")


@dataclass
class MethodEstimate:
    """Peak memory of one method; the components are those alive at the peak and add up to ``total_bytes``."""

    name: str
    description: str
    total_bytes: int
    components: dict[str, int]
    peak_phase: str  # "forward/backward" or "optimizer step"
    activation_peak_bytes: int  # largest activations at any time (forward/backward), for reference
    trainable_parameters: int
    total_parameters: int
    gradient_checkpointing: bool
    host_bytes: int = 0  # host memory (not in total_bytes): HFT's originals, and offloaded_bytes
    offloaded_bytes: int = 0  # masters, optimizer state and step copies in host memory ("fp32_offload")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MemoryEstimate:
    """:func:`estimate_memory`'s answer: the inputs and one :class:`MethodEstimate` per method."""

    model: str
    model_type: str
    dtype: str
    batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    methods: dict[str, MethodEstimate] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "methods"}
        out["methods"] = {name: m.to_dict() for name, m in self.methods.items()}
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# ------------------------------------------------------------------------------------------------------------------
# Counting live bytes on the meta device
# ------------------------------------------------------------------------------------------------------------------


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of every storage created under it that is still alive, and the peak of that count.

    Storages that existed before (weights, buffers) are not counted. ``grad_bytes`` is kept up to date by gradient
    hooks, so ``activations = live - grad_bytes`` at any time. ``Tensor.item()`` on meta tensors (data-dependent
    Python control flow in transformers, e.g. the packed-sequence check) answers ``True``/``1``: full, unpacked
    sequences.
    """

    def __init__(self, existing: list[torch.Tensor]) -> None:
        super().__init__()
        self.known = {t.untyped_storage()._cdata for t in existing}
        self.live = 0
        self.grad_bytes = 0
        self.peak = 0
        self.peak_grads = 0
        self.peak_temporaries = 0
        self.peak_activations = 0
        self._finalizers: dict[int, Any] = {}

    def _freed(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._finalizers.pop(key, None)

    def note(self, temporaries: int = 0) -> None:
        """Record the current count; ``temporaries``: bytes alive only now (a tensor's step fused into backward)."""
        activations = self.live - self.grad_bytes
        self.peak_activations = max(self.peak_activations, activations)
        if self.live + temporaries > self.peak:
            self.peak, self.peak_grads, self.peak_temporaries = self.live + temporaries, self.grad_bytes, temporaries

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            return True if args[0].dtype == torch.bool else 1
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key in self.known or key in self._finalizers:
                continue
            nbytes = storage.nbytes()
            self.live += nbytes
            self._finalizers[key] = weakref.finalize(storage, self._freed, key, nbytes)
        self.note()
        return out


FUSED_ATTENTION = "peft_hft_meta_fused_sdpa"


def _fused_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' ``sdpa`` attention as the fused kernels run it, for full unpadded sequences.

    On meta tensors ``scaled_dot_product_attention`` takes the math path and keeps a ``seq x seq`` attention matrix,
    which no GPU kernel (flash, memory-efficient) nor the CPU flash kernel keeps; the CPU flash kernel has meta
    kernels (forward and backward, grouped-query attention included), so it stands in for all of them. With a mask
    (padding) transformers' own function runs, as it would.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    causal = query.shape[2] > 1 and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
    out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout, causal,
                                                                     scale=scaling)[0]
    return out.transpose(1, 2).contiguous(), None


def _use_fused_attention(model: nn.Module) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FUSED_ATTENTION, _fused_attention)
    AttentionMaskInterface.register(FUSED_ATTENTION, sdpa_mask)
    if getattr(model.config, "_attn_implementation", None) in ("sdpa", None, "eager"):
        for module in model.modules():
            config = getattr(module, "config", None)
            if config is not None and hasattr(config, "_attn_implementation"):
                config._attn_implementation = FUSED_ATTENTION


@dataclass
class _PassMemory:
    peak: int
    grads_at_peak: int
    activation_peak: int
    grads_at_end: int
    temporaries_at_peak: int = 0


@contextlib.contextmanager
def _autocast_off_on_meta():
    """During the meta step, ``torch.is_autocast_enabled("meta")`` answers False instead of raising.

    The rotary embeddings of older transformers (5.1 among them) ask it of their input's device type
    (``maybe_autocast``), and torch has no autocast for "meta"; on meta tensors autocast is off, so False is the true
    answer. Restored after the step: nothing outside it sees the change.
    """
    original = torch.is_autocast_enabled

    def is_autocast_enabled(*args: Any) -> bool:
        if args and (args[0] == "meta" or getattr(args[0], "type", None) == "meta"):
            return False
        return original(*args)

    torch.is_autocast_enabled = is_autocast_enabled
    try:
        yield
    finally:
        torch.is_autocast_enabled = original


def _run_step_on_meta(model: nn.Module, batch_size: int, seq_len: int,
                      step_in_backward: Optional[Callable[[torch.Tensor], int]] = None) -> _PassMemory:
    """One forward and backward pass of ``model`` (on the meta device) under :class:`_LiveBytes`.

    ``step_in_backward``: the optimizer step is fused into backward; the callable gives the bytes of a tensor's step
    temporaries, counted while its gradient is still alive, after which the gradient is dropped.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    tracker = _LiveBytes(list(model.parameters()) + list(model.buffers()))
    has_grad: set[int] = set()
    drop_gradients = step_in_backward is not None

    def on_gradient(param: torch.Tensor) -> None:
        if id(param) not in has_grad:
            has_grad.add(id(param))
            tracker.grad_bytes += param.grad.numel() * param.grad.element_size()
        tracker.note(step_in_backward(param) if drop_gradients else 0)
        if drop_gradients:  # the optimizer step in backward: the gradient is used and freed right away
            tracker.grad_bytes -= param.grad.numel() * param.grad.element_size()
            has_grad.discard(id(param))
            param.grad = None

    handles = [p.register_post_accumulate_grad_hook(on_gradient) for p in params]
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device="meta")
    try:
        with tracker, warnings.catch_warnings(), _autocast_off_on_meta():
            warnings.simplefilter("ignore")
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            del loss
            tracker.note()
    finally:
        for handle in handles:
            handle.remove()
    grads_at_end = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    for p in params:
        p.grad = None
    return _PassMemory(tracker.peak, tracker.peak_grads, tracker.peak_activations, grads_at_end,
                       tracker.peak_temporaries)


# ------------------------------------------------------------------------------------------------------------------
# Building each method's model on the meta device
# ------------------------------------------------------------------------------------------------------------------

LORA_TARGETS = "all-linear"


def _load_meta_model(source: Path, dtype: torch.dtype) -> nn.Module:
    directory = source.parent if source.is_file() else source
    if source.is_file() and source.name != "config.json":
        raise ValueError(f"{source} is not a config.json. Pass a model directory or its config.json.")
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"No config.json in {directory}. Pass a model directory or its config.json.")
    model = meta_model(directory)
    if model is None:
        raise ValueError(
            f"Could not build the model of {directory / 'config.json'} on the meta device: its architecture is not "
            "one that ships with transformers (configs with auto_map / remote code are never executed). Fix: pass "
            "the config.json of a transformers architecture, or upgrade transformers."
        )
    model.to(dtype)
    _use_fused_attention(model)
    model.config.use_cache = False
    model.train()
    return model


def _prepare(model: nn.Module, recipe: TrainingRecipe, selection: list[str], lora_rank: int,
             checkpointing: bool) -> nn.Module:
    if checkpointing:
        with warnings.catch_warnings():  # transformers 5 renames it activation_checkpointing_enable
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if recipe.trained == "all":
        model.requires_grad_(True)
        return model
    model.requires_grad_(False)
    if recipe.trained == "hft":
        for name in selection:
            model.get_parameter(name).requires_grad_(True)
        return model
    if recipe.trained == "lora":
        from peft import LoraConfig, get_peft_model

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank,
                                                    target_modules=LORA_TARGETS))
    raise ValueError(f"Unknown trained={recipe.trained!r}; use 'all', 'hft' or 'lora'.")


def _frozen_weight_bytes(param: torch.Tensor, scheme: Optional[str]) -> int:
    if scheme is None:
        return param.numel() * param.element_size()
    return FROZEN_QUANTIZATION[scheme](param.numel(), param.element_size())


def _one_tensor_scratch(param: torch.Tensor, recipe: TrainingRecipe, numel: Optional[int] = None,
                        sliced: bool = False) -> int:
    """Bytes beyond its copies for the step of stepping ``param`` (or ``numel`` elements of it, one slice): the
    optimizer's own scratch (torchao's dequantized moments), then the post-step hook's write-back; they follow each
    other, so the larger counts. The write-back frees the fp32 gradient copy (4 per element), allocates the new
    low-precision weight where the step freed it (a slice is written into the kept one; Kahan's compensation goes
    into its old buffer) and needs the scratch of one piece."""
    n = param.numel() if numel is None else numel
    optimizer_scratch = n * OPTIMIZERS[recipe.optimizer].step_temporary_bytes
    master = MASTER_WEIGHTS[recipe.master_weights]
    if not is_low_precision(param) or master.step_copy_bytes == 0:  # no master option: nothing is written back
        return optimizer_scratch
    new_weight = param.element_size() if master.weight_freed_in_step and not sliced else 0
    write_back = n * (new_weight - 4) + min(n, precision.WRITE_BACK_CHUNK) * master.write_back_scratch_bytes
    return max(optimizer_scratch, write_back)


def _step_temporary_bytes(param: torch.Tensor, recipe: TrainingRecipe) -> int:
    """Bytes alive while ``param`` alone is stepped (the step fused into backward): the copies HFT's pre-step hook
    hands the optimizer (less the low-precision weight it frees meanwhile) and the scratch of the step itself.

    A tensor stepped in slices (``chunk_elements``, :func:`peft_hft.integrations.low_memory.slice_spans`) needs them
    for its largest slice only, and keeps its weight meanwhile (each slice is written back into it)."""
    master = MASTER_WEIGHTS[recipe.master_weights]
    low_precision = is_low_precision(param)
    if low_precision and master.on_host:  # the weight freed meanwhile is written anew: nothing on the accelerator
        return 0
    n, slices = _largest_slice(param, recipe)
    copies = n * master.step_copy_bytes if low_precision else 0
    freed = n * param.element_size() if low_precision and master.weight_freed_in_step and slices == 1 else 0
    return copies - freed + _one_tensor_scratch(param, recipe, n, sliced=slices > 1)


def _largest_slice(param: torch.Tensor, recipe: TrainingRecipe) -> tuple[int, int]:
    """Elements of the largest slice ``param`` is stepped in (``chunk_elements``,
    :func:`peft_hft.integrations.low_memory.slice_spans`), and how many slices there are."""
    from ..integrations.low_memory import slice_spans

    spans = slice_spans(param.numel(), recipe.chunk_elements)
    return max(stop - start for start, stop in spans), len(spans)


def _host_step_bytes(param: torch.Tensor, recipe: TrainingRecipe) -> int:
    """Host memory of one offloaded tensor's step (``"fp32_offload"``): the fp32 copy of its gradient (of its
    largest slice) and the optimizer's scratch."""
    n, _ = _largest_slice(param, recipe)
    master, optimizer = MASTER_WEIGHTS[recipe.master_weights], OPTIMIZERS[recipe.optimizer]
    return n * (master.step_copy_bytes + optimizer.step_temporary_bytes)


def _estimate_method(name: str, recipe: TrainingRecipe, model: nn.Module, passes: _PassMemory, checkpointing: bool,
                     quantizable: set[str]) -> MethodEstimate:
    master = MASTER_WEIGHTS[recipe.master_weights]
    optimizer = OPTIMIZERS[recipe.optimizer]
    weights = masters = state = host = offloaded = 0
    offloaded_step = 0  # the largest step's copies and scratch in host memory
    trainable = total = 0
    for pname, param in model.named_parameters():
        total += param.numel()
        if not param.requires_grad:
            scheme = recipe.quantize_frozen if pname in quantizable else None
            weights += _frozen_weight_bytes(param, scheme)
            continue
        n = param.numel()
        trainable += n
        weights += n * param.element_size()
        low_precision = is_low_precision(param)
        sees_fp32 = low_precision and master.optimizer_sees_fp32
        tensor_state = optimizer.state_bytes(n, 4 if sees_fp32 else param.element_size())
        if low_precision and master.on_host:
            offloaded += n * master.state_bytes + tensor_state
            offloaded_step = max(offloaded_step, _host_step_bytes(param, recipe))
        else:
            masters += n * master.state_bytes if low_precision else 0
            state += tensor_state
        if recipe.trained == "hft":
            host += n * param.element_size()  # the originals, kept in host memory (originals_device="cpu")
    static = {"weights": weights, "masters": masters, "optimizer_state": state}
    if recipe.step_in_backward:
        dynamic = {"gradients": passes.grads_at_peak,
                   "activations": passes.peak - passes.grads_at_peak - passes.temporaries_at_peak,
                   "step_temporaries": passes.temporaries_at_peak}
        phase = "forward/backward"
    else:
        # every optimizer modelled here is elementwise, so HFT's pre-step hook steps one trained tensor at a time:
        # the step holds the copies and scratch of the largest tensor only (tuner/precision.py)
        temporaries = max((_step_temporary_bytes(p, recipe) for p in model.parameters() if p.requires_grad),
                          default=0)
        at_step = passes.grads_at_end + temporaries
        if passes.peak >= at_step:
            dynamic = {"gradients": passes.grads_at_peak, "activations": passes.peak - passes.grads_at_peak,
                       "step_temporaries": 0}
            phase = "forward/backward"
        else:
            dynamic = {"gradients": passes.grads_at_end, "activations": 0, "step_temporaries": temporaries}
            phase = "optimizer step"
    components = {**static, **dynamic}
    return MethodEstimate(
        name=name,
        description=recipe.description,
        total_bytes=sum(components.values()),
        components={k: int(components[k]) for k in COMPONENTS},
        peak_phase=phase,
        activation_peak_bytes=int(passes.activation_peak),
        trainable_parameters=trainable,
        total_parameters=total,
        gradient_checkpointing=checkpointing,
        host_bytes=host + offloaded + offloaded_step,
        offloaded_bytes=offloaded + offloaded_step,
    )


def estimate_memory(
    model: Union[str, Path],
    batch_size: int = 1,
    seq_len: int = 2048,
    gradient_checkpointing: bool = False,
    dtype: str = "bfloat16",
    methods: Optional[list[str]] = None,
    hft_config: Optional[HFTConfig] = None,
    lora_rank: int = 16,
    recipes: Optional[dict[str, TrainingRecipe]] = None,
) -> MemoryEstimate:
    """Estimate the peak training memory of one step for FFT, LoRA, plain freezing and HFT in each memory option.

    Nothing is loaded: the model is built from its ``config.json`` on the meta device, so an 8B model takes seconds.

    Args:
        model: A local model directory or its ``config.json``.
        batch_size, seq_len: The batch a step sees (full, unpadded sequences).
        gradient_checkpointing: Recompute each block's activations in backward (transformers'
            ``gradient_checkpointing_enable(use_reentrant=False)``). Recipes that fix it (the low-memory preset)
            keep their own setting.
        dtype: The dtype the weights are loaded in (``"bfloat16"``, ``"float16"``, ``"float32"``).
        methods: Names from :func:`default_recipes` (default: all of them).
        hft_config: The HFT selection to estimate (default ``HFTConfig()``: ratio 0.5, the category strategy).
        lora_rank: Rank of the LoRA comparison (all linear layers, fp32 adapter weights as PEFT keeps them).
        recipes: Replace the method table (name -> :class:`TrainingRecipe`).

    Returns:
        A :class:`MemoryEstimate`; ``.to_dict()["methods"][name]["total_bytes"]`` is the peak of each method.
    """
    source = Path(model)
    weight_dtype = torch_dtype(dtype, "dtype")
    table = recipes if recipes is not None else default_recipes(lora_rank)
    names = list(table) if methods is None else list(methods)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"Unknown method(s) {unknown}; choose from {sorted(table)}.")
    for n in names:
        recipe = table[n]
        if recipe.master_weights not in MASTER_WEIGHTS:
            raise ValueError(
                f"{n}: unknown master_weights {recipe.master_weights!r}; use one of {list(MASTER_WEIGHTS)}."
            )
        if recipe.optimizer not in OPTIMIZERS:
            raise ValueError(f"{n}: unknown optimizer {recipe.optimizer!r}; use one of {list(OPTIMIZERS)}.")
        if recipe.quantize_frozen not in (None, *FROZEN_QUANTIZATION):
            raise ValueError(f"{n}: unknown quantize_frozen {recipe.quantize_frozen!r}; use one of "
                             f"{list(FROZEN_QUANTIZATION)}.")
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}.")
    reference = _load_meta_model(source, weight_dtype)
    config = hft_config or HFTConfig()
    selection = resolve_selection(reference, config)
    quantizable = set(quantizable_weights(reference, selection))
    result = MemoryEstimate(
        model=str(source),
        model_type=getattr(reference.config, "model_type", type(reference).__name__),
        dtype=str(weight_dtype).replace("torch.", ""),
        batch_size=batch_size,
        seq_len=seq_len,
        gradient_checkpointing=gradient_checkpointing,
    )
    runs: dict[tuple, tuple[nn.Module, _PassMemory]] = {}  # methods that train alike share one meta run
    for n in tqdm(names, desc="Estimating", unit="method", disable=len(names) < 4):
        recipe = table[n]
        checkpointing = (
            gradient_checkpointing if recipe.gradient_checkpointing is None else recipe.gradient_checkpointing
        )
        fused = (recipe.master_weights, recipe.optimizer, recipe.chunk_elements) if recipe.step_in_backward else None
        key = (recipe.trained, checkpointing, fused)
        if key not in runs:
            model_n = _prepare(_load_meta_model(source, weight_dtype), recipe, selection, lora_rank, checkpointing)
            temporaries = (
                (lambda p, r=recipe: _step_temporary_bytes(p, r)) if recipe.step_in_backward else None
            )
            runs[key] = model_n, _run_step_on_meta(model_n, batch_size, seq_len, temporaries)
        model_n, passes = runs[key]
        result.methods[n] = _estimate_method(n, recipe, model_n, passes, checkpointing, quantizable)
    return result


def format_estimate(estimate: MemoryEstimate, unit: str = "GiB") -> str:
    """The table ``peft-hft estimate-memory`` prints: one row per method, the components at its peak."""
    scale = {"GiB": GiB, "MiB": 2**20}[unit]
    header = ["method", "total", "weights", "masters", "optim", "grads", "activ.", "step tmp", "host", "trained",
              "peak in"]
    rows = []
    fft = estimate.methods.get("fft")
    for m in estimate.methods.values():
        c = m.components
        rows.append([
            m.name,
            f"{m.total_bytes / scale:.2f}",
            *(f"{c[k] / scale:.2f}" for k in COMPONENTS),
            f"{m.host_bytes / scale:.2f}",
            f"{100 * m.trainable_parameters / max(m.total_parameters, 1):.1f}%",
            m.peak_phase + (" (ckpt)" if m.gradient_checkpointing else ""),
        ])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list) -> str:
        return "  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w)
                         for i, (x, w) in enumerate(zip(cells, widths, strict=True)))

    lines = [
        f"Peak training memory of one step ({unit}): {estimate.model_type} from {estimate.model}, {estimate.dtype} "
        f"weights, batch {estimate.batch_size} x {estimate.seq_len} tokens, gradient checkpointing "
        f"{'on' if estimate.gradient_checkpointing else 'off'}",
        line(header),
    ]
    for r in rows:
        lines.append(line(r))
    if fft is not None and "hft" in estimate.methods:
        lines.append(f"hft / fft = {estimate.methods['hft'].total_bytes / fft.total_bytes:.2f}")
    hft = estimate.methods.get("hft")
    if hft is not None and hft.host_bytes:
        lines.append(f"host: host memory, not in the totals: HFT's originals of its trained tensors "
                     f"({hft.host_bytes / scale:.2f} {unit}; HFTConfig(originals_device='device') puts them on the "
                     "device), and the masters and optimizer state of master_weights='fp32_offload'.")
    lines.append("Activations at the peak; the fp32 logits of the loss are included. Allocator overhead is not "
                 "(budget ~5-10% more on CUDA).")
    return "\n".join(lines)
