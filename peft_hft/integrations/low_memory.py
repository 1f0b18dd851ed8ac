"""Low-memory training of the trained half: the optimizer step fused into backward, torchao's low-bit AdamW, and the
low-memory preset that combines them with ``HFTConfig(master_weights=...)`` and gradient checkpointing.

Per trained parameter of a bf16 model, a plain AdamW run holds the bf16 weight (2 bytes), its master (4 with
``master_weights="fp32"``), a bf16 gradient (2, and an fp32 copy during the step) and two fp32 moments (8). The three
pieces here remove most of it:

* :func:`optimizer_in_backward` steps each trained tensor as soon as its gradient is complete
  (``Tensor.register_post_accumulate_grad_hook``, as in PyTorch's tutorial "How to save memory by fusing the optimizer
  step into the backward pass" and torchtune's ``register_optim_in_bwd_hooks``), so at most a few gradients (and their
  fp32 copies) are alive at once instead of all of them;
* torchao's ``AdamW8bit`` / ``AdamW4bit`` keep the two moments in 8 or 4 bits (2 or 1 byte per parameter instead of 8):
  :func:`low_bit_adamw` names them; ``TrainingArguments(optim="adamw_torch_8bit" / "adamw_torch_4bit")`` is
  transformers' own spelling of the same optimizers;
* ``HFTConfig(master_weights="kahan" / "stochastic_rounding")`` keeps the small updates with 2 or 0 bytes per
  parameter instead of fp32's 4 (peft_hft/tuner/precision.py).

:func:`low_memory_preset` is the combination, defined once here and documented in README ("Low-memory training");
``low_memory_preset(offload=True)`` is the other way to the same memory: default HFT's training with its fp32 masters
and AdamW's state in host memory (``master_weights="fp32_offload"``), stepped after backward by the Trainer's own
AdamW, so the global clip and gradient accumulation stay.

What the fused step cannot do: gradient accumulation (each backward pass would be a step) and clipping by the global
gradient norm (the norm is only known after the last gradient, when the first tensors were stepped already). Both
are refused with an error naming the fix, never trained wrongly. What it offers instead is clipping per tensor
(``clip_per_tensor``): each tensor's gradient is scaled to at most that norm before its step, which bounds every
tensor's update against a gradient spike but is not the global clip (the global norm may reach ``clip_per_tensor``
times the square root of the number of tensors). With it, ``OptimizerInBackward.grad_norm`` reports the global norm
of the last step's gradients, before clipping, for logging (computed from the per-tensor norms the clipping needs).

The first step of torchao's optimizers compiles its kernel (``torch.compile``; about 40 s on a CPU, once per process).
``torch.compiler.set_stance("force_eager")`` skips the compilation (eager steps are slower, fine for short runs and
tests).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, Optional

import torch
from torch import nn

from ..tuner.config import HFTConfig
from ..tuner.precision import (
    ELEMENTWISE_OPTIMIZERS,
    load_state_into_host_memory,
    place_loaded_state,
    refresh_slice,
    slice_parameter,
    steps_elementwise,
)

LOW_BIT_OPTIMIZERS = {8: "AdamW8bit", 4: "AdamW4bit"}
# The preset's moments: torchao's low-bit AdamW, or (32) torch's AdamW in fp32 (the offloaded preset's default).
FP32_MOMENT_BITS = 32
PRESET_MOMENT_BITS = (*LOW_BIT_OPTIMIZERS, FP32_MOMENT_BITS)
# Slices are multiples of this many elements, so that the blocks of torchao's quantized states (128 or 256 elements)
# fall where they would in the whole tensor.
CHUNK_MULTIPLE = 4096
# The low-memory preset's slice: bounds the step's scratch of any tensor (the embedding and lm_head of an 8B model
# hold 525M elements each) to that of 16M elements (about 0.5 GiB with AdamW4bit and stochastic rounding).
PRESET_CHUNK_ELEMENTS = 1 << 24
# The low-memory preset's bound on each tensor's gradient norm: the fused step cannot clip by the global norm as the
# Trainer's default max_grad_norm=1.0 does, and unclipped the 8-bit preset broke the general model on the forgetting
# benchmark (Wikipedia perplexity +1,373% at lr 1e-4, +78.7% clipped at lr 3e-4; docs/forgetting.md).
PRESET_CLIP_PER_TENSOR = 1.0
# Hyperparameters of a param group that schedulers or users change during training; copied to the per-tensor
# optimizers before each of their steps.
_SCHEDULED = ("lr", "weight_decay", "betas", "momentum", "eps")


# Gradients beyond this many elements have their norm taken in slices of it (a float32 scratch of 1 MiB).
_NORM_SLICE = 1 << 18


def gradient_norm(gradient: torch.Tensor) -> torch.Tensor:
    """The 2-norm of ``gradient`` as a float32 scalar tensor (no host sync), taken in slices of ``_NORM_SLICE``.

    Why slices: ``vector_norm(x, dtype=torch.float32)`` of a bf16 tensor first makes a float32 copy of all of it (2.1
    GB for the 525M-element embedding of Llama-3-8B), and its one float32 sum over 100M bf16 elements measured 1.1%
    off the float64 norm in 0.12 s; per-slice norms combined keep one slice's scratch and measured 5e-6 off in 0.03 s
    (2-core Intel Xeon VM with AMX, torch 2.13 CPU).
    """
    flat = gradient.reshape(-1)
    if flat.numel() <= _NORM_SLICE:
        return torch.linalg.vector_norm(flat, dtype=torch.float32)
    parts = [torch.linalg.vector_norm(flat[i:i + _NORM_SLICE], dtype=torch.float32)
             for i in range(0, flat.numel(), _NORM_SLICE)]
    return torch.linalg.vector_norm(torch.stack(parts))


def _is_trainer(obj: Any) -> bool:
    """A transformers ``Trainer`` (or TRL's), recognised by what the optimizer functions use of it."""
    return hasattr(obj, "args") and hasattr(obj, "model") and hasattr(obj, "create_optimizer")


def low_bit_adamw(bits: int = 8) -> type[torch.optim.Optimizer]:
    """torchao's AdamW with ``bits``-bit moments (``torchao.optim.AdamW8bit`` or ``AdamW4bit``).

    Works with every ``HFTConfig.master_weights`` option: HFT's optimizer-step hooks hand it the fp32 value of each
    trained tensor, as to any torch optimizer, and its quantized state keeps its codes when a checkpoint is loaded.
    Tensors under 4096 elements (norms, biases) keep ordinary state, as in bitsandbytes.
    """
    if bits not in LOW_BIT_OPTIMIZERS:
        raise ValueError(f"low_bit_adamw(bits={bits!r}): torchao offers 8-bit and 4-bit AdamW. Fix: bits=8 or bits=4.")
    try:
        import torchao.optim
    except ImportError as error:
        raise ImportError(
            "Low-bit AdamW needs torchao. Fix: pip install 'peft-hft[lowmem]' (or pip install torchao)."
        ) from error
    return getattr(torchao.optim, LOW_BIT_OPTIMIZERS[bits])


def check_optimizer_in_backward_args(args: Any) -> None:
    """Raise if Trainer arguments ask for what a step fused into backward cannot do (accumulation, global clipping)."""
    accumulation = getattr(args, "gradient_accumulation_steps", 1)
    if accumulation != 1:
        raise ValueError(
            f"gradient_accumulation_steps={accumulation} cannot work with the optimizer step fused into backward: "
            "every backward pass steps the tensors, so the gradients of several micro-batches are never summed. "
            "Fix: gradient_accumulation_steps=1 with a larger per_device_train_batch_size (gradient checkpointing "
            "makes room for it), or train without optimizer_in_backward."
        )
    max_grad_norm = getattr(args, "max_grad_norm", 0) or 0
    if max_grad_norm > 0:
        raise ValueError(
            f"max_grad_norm={max_grad_norm} (Trainer's default is 1.0) clips by the global gradient norm, which is "
            "only known after the last gradient, when the optimizer fused into backward has stepped the other "
            "tensors already, and their gradients are gone. Fix: TrainingArguments(max_grad_norm=0) (and, to bound "
            "each tensor's gradient instead, optimizer_in_backward(..., clip_per_tensor=1.0)), or train without "
            "optimizer_in_backward."
        )


class OptimizerInBackward(torch.optim.Optimizer):
    """The optimizer handed to ``Trainer``/TRL when the real steps happen in backward, one tensor at a time.

    Each trained tensor has its own optimizer (of the class given), stepped by a post-accumulate-grad hook as soon
    as the tensor's gradient is complete, after which the gradient is freed. This object holds the trained tensors in
    one param group, so learning-rate schedulers (the Trainer's included) work on it unchanged; its group's
    hyperparameters are copied to the per-tensor optimizers before each of their steps. ``step()`` marks the end of
    a training step (the updates already happened) and ``zero_grad()`` has nothing left to clear. ``state_dict()``
    holds every tensor's state under its index, like one ordinary optimizer, so Trainer checkpoints save and resume
    it.

    With ``chunk_elements``, a tensor larger than that is stepped in slices of at most that many elements, each with
    its own optimizer over a :func:`~peft_hft.tuner.precision.slice_parameter` view: the step's scratch (torchao's
    dequantized moments, HFT's fp32 copies of the value and the gradient) is then that of one slice instead of the
    whole tensor. It is the same step for elementwise optimizers only (:data:`ELEMENTWISE_OPTIMIZERS`); others are
    refused.

    With ``clip_per_tensor``, each tensor's gradient is scaled to a norm of at most that value before its step (the
    whole tensor's norm, also when it is stepped in slices), and ``grad_norm`` is the global norm of the gradients of
    the last completed step before clipping (``None`` before the first, and without ``clip_per_tensor``: unclipped
    steps compute no norms), computed from the per-tensor norms.

    Calling ``backward`` twice without ``step()`` in between (gradient accumulation) raises, as does being stepped
    by a Trainer whose arguments clip by the global gradient norm.
    """

    def __init__(self, params: Iterable[nn.Parameter], optimizer_cls: type[torch.optim.Optimizer],
                 chunk_elements: Optional[int] = None, clip_per_tensor: Optional[float] = None, **kwargs: Any):
        params = list(dict.fromkeys(p for p in params if p.requires_grad))  # tied tensors once
        if not params:
            raise ValueError("optimizer_in_backward found no trainable parameters; create the HFT adapter first.")
        _check_chunking(optimizer_cls, chunk_elements)
        _check_clip(clip_per_tensor)
        super().__init__(params, dict(kwargs))
        self.optimizer_cls = optimizer_cls
        self.chunk_elements = chunk_elements
        self.clip_per_tensor = None if clip_per_tensor is None else float(clip_per_tensor)
        self.grad_norm: Optional[float] = None
        self._squared_norms: list[torch.Tensor] = []  # of this step's gradients, summed once at step()
        # per tensor: one optimizer over the tensor, or one per slice of it
        self.optimizers = [[optimizer_cls([s], **kwargs) for s in _slices(p, chunk_elements)] for p in params]
        self._index = {id(p): i for i, p in enumerate(params)}
        self._stepped_since_step: set[int] = set()
        self._checked_trainer = False
        self._handles = [p.register_post_accumulate_grad_hook(self._step_tensor) for p in params]

    def _step_tensor(self, param: torch.Tensor) -> None:
        index = self._index[id(param)]
        if index in self._stepped_since_step:
            param.grad = None
            raise RuntimeError(
                "A trained tensor received a second gradient before optimizer.step(): gradient accumulation (or a "
                "second backward pass per step), which the optimizer fused into backward cannot do (each backward "
                "steps the tensors). Fix: gradient_accumulation_steps=1 and call optimizer.step() after every "
                "backward, or train without optimizer_in_backward."
            )
        self._stepped_since_step.add(index)
        if self.clip_per_tensor is not None:
            self._clip(param.grad)
        inners = self.optimizers[index]
        if len(inners) == 1:  # stepped whole (_slices gives a sliced tensor two slices or more)
            _copy_hyperparameters(self.param_groups[0], inners[0].param_groups[0], _SCHEDULED)
            inners[0].step()
            inners[0].zero_grad(set_to_none=True)
            return
        gradient, start = param.grad.reshape(-1), 0
        param.grad = None  # the slices hold views of it until their steps are done
        for inner in inners:
            view = inner.param_groups[0]["params"][0]
            refresh_slice(view)
            view.grad, start = gradient[start:start + view.numel()], start + view.numel()
            _copy_hyperparameters(self.param_groups[0], inner.param_groups[0], _SCHEDULED)
            inner.step()
            view.grad = None

    @torch.no_grad()
    def _clip(self, gradient: torch.Tensor) -> None:
        """Record the gradient's norm (for ``grad_norm``) and scale it to at most ``clip_per_tensor``, without a
        host sync: the factor stays a tensor, as in ``torch.nn.utils.clip_grad_norm_``. Unclipped steps skip it: the
        norm is one more pass over every gradient, paid only where the clipping needs it."""
        norm = gradient_norm(gradient)
        self._squared_norms.append(norm.square())
        gradient.mul_(torch.clamp(self.clip_per_tensor / (norm + 1e-6), max=1.0).to(gradient.dtype))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D401 - the steps ran in backward
        """End of a training step: the tensors were stepped in backward already."""
        if not self._checked_trainer:
            self._checked_trainer = True
            _check_calling_trainer()
        self._stepped_since_step.clear()
        if self._squared_norms:
            self.grad_norm = float(torch.stack(self._squared_norms).sum().sqrt())
            self._squared_norms = []
        if closure is not None:
            with torch.enable_grad():
                return closure()
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "optimizers", None) is not None:
            raise NotImplementedError(
                "OptimizerInBackward holds one group of trained tensors; create a new one with optimizer_in_backward "
                "for other tensors."
            )
        super().add_param_group(param_group)

    def state_dict(self) -> dict:
        """Every tensor's state under its index, like one ordinary optimizer; a sliced tensor's under
        ``{"slices": [...]}``, one entry per slice (a checkpoint resumes with the same ``chunk_elements``)."""
        own = super().state_dict()
        state = {}
        for index, inners in enumerate(self.optimizers):
            states = [inner.state_dict()["state"].get(0) for inner in inners]
            if len(inners) > 1:
                state[index] = {"slices": states}
            elif states[0] is not None:
                state[index] = states[0]
        return {"state": state, "param_groups": own["param_groups"]}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict({"state": {}, "param_groups": state_dict["param_groups"]})
        saved_group = state_dict["param_groups"][0]
        for index, inners in enumerate(self.optimizers):
            state = state_dict["state"].get(index, state_dict["state"].get(str(index)))
            sliced = isinstance(state, dict) and "slices" in state
            states = state["slices"] if sliced else [state]
            if (len(inners) > 1 or sliced) and len(states) != len(inners):
                raise ValueError(
                    f"The optimizer state of tensor {index} was saved in {len(states)} slice(s), but this optimizer "
                    f"steps it in {len(inners)} (chunk_elements={self.chunk_elements}). Fix: resume with the "
                    "chunk_elements the checkpoint was trained with."
                )
            for inner, one in zip(inners, states, strict=True):
                inner.load_state_dict({"state": {} if one is None else {0: one},
                                       "param_groups": inner.state_dict()["param_groups"]})
                place_loaded_state(inner)  # offloaded masters: the state goes to host memory now, tensor by tensor
                _copy_hyperparameters(saved_group, inner.param_groups[0], [k for k in saved_group if k != "params"])

    def remove_hooks(self) -> None:
        """Stop stepping in backward (the tensors then keep their gradients again)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _check_clip(clip_per_tensor: Optional[float]) -> None:
    if clip_per_tensor is None:
        return
    if isinstance(clip_per_tensor, bool) or not isinstance(clip_per_tensor, (int, float)) or not (
        0 < clip_per_tensor < float("inf")
    ):
        raise ValueError(
            f"clip_per_tensor={clip_per_tensor!r}: the largest gradient norm a tensor may step with must be a positive "
            "finite number. Fix: e.g. clip_per_tensor=1.0, or None not to clip."
        )


def _check_chunking(optimizer_cls: type, chunk_elements: Optional[int]) -> None:
    if chunk_elements is None:
        return
    if isinstance(chunk_elements, bool) or not isinstance(chunk_elements, int) or chunk_elements <= 0 or (
        chunk_elements % CHUNK_MULTIPLE
    ):
        raise ValueError(
            f"chunk_elements={chunk_elements!r}: slices must hold a positive multiple of {CHUNK_MULTIPLE} elements "
            "(so that quantized optimizer states keep their blocks). Fix: e.g. chunk_elements=2**24, or None to step "
            "every tensor whole."
        )
    name = f"{optimizer_cls.__module__}.{optimizer_cls.__qualname__}"
    if not steps_elementwise(optimizer_cls):
        raise ValueError(
            f"chunk_elements steps a tensor slice by slice, which is the same step only for an elementwise optimizer; "
            f"{name} is not known to be one (a factored or norm-based optimizer would step each slice differently). "
            f"Fix: chunk_elements=None, or one of {sorted(ELEMENTWISE_OPTIMIZERS)}."
        )


def slice_spans(numel: int, chunk_elements: Optional[int]) -> list[tuple[int, int]]:
    """The ``[start, stop)`` spans a tensor of ``numel`` elements is stepped in (one span: stepped whole).

    Spans hold ``chunk_elements``; a tail under 4096 elements joins the span before it (torchao keeps unquantized state
    for tensors that small, which the whole tensor would not have). The memory estimate uses the same spans.
    """
    if chunk_elements is None or numel < chunk_elements + CHUNK_MULTIPLE:
        return [(0, numel)]
    starts = list(range(0, numel, chunk_elements))
    if numel - starts[-1] < CHUNK_MULTIPLE:
        starts.pop()
    return list(zip(starts, [*starts[1:], numel], strict=True))


def _slices(param: nn.Parameter, chunk_elements: Optional[int]) -> list[nn.Parameter]:
    spans = slice_spans(param.numel(), chunk_elements)
    return [param] if len(spans) == 1 else [slice_parameter(param, *span) for span in spans]


def _copy_hyperparameters(source: dict, target: dict, keys: Iterable[str]) -> None:
    for key in keys:
        if key in source and key in target:
            value, current = source[key], target[key]
            if isinstance(current, torch.Tensor):
                current.fill_(value)  # torchao keeps lr as a tensor (its compiled step reads it)
            else:
                target[key] = value


def _check_calling_trainer() -> None:
    """At the first ``step()``: if a transformers Trainer calls, refuse the arguments the fused step cannot honour.

    The Trainer clips gradients (``max_grad_norm=1.0`` by default) before it calls ``step()``; after the fused steps
    there is nothing left to clip, so that run would silently train unclipped.
    """
    if "transformers" not in sys.modules:
        return
    from transformers import Trainer

    frame = sys._getframe(2)
    for _ in range(12):
        if frame is None:
            return
        owner = frame.f_locals.get("self")
        if isinstance(owner, Trainer):
            check_optimizer_in_backward_args(owner.args)
            return
        frame = frame.f_back


def optimizer_in_backward(
    model: Any,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    *,
    training_args: Any = None,
    chunk_elements: Optional[int] = None,
    clip_per_tensor: Optional[float] = None,
    **optimizer_kwargs: Any,
) -> OptimizerInBackward:
    """Fuse the optimizer step into backward for every trainable tensor of ``model``; returns the placeholder optimizer.

    Args:
        model: The model (a PeftModel with an HFT adapter, or any model) whose trainable tensors to step; or a
            transformers/TRL ``Trainer`` (e.g. an ``SFTTrainer`` given ``peft_config``, which wraps the model
            itself): then its arguments are checked and the optimizer is installed as ``trainer.optimizer``, and the
            Trainer builds its learning-rate scheduler on it as usual.
        optimizer_cls: The optimizer each tensor gets (``torch.optim.AdamW``, ``low_bit_adamw(8)``, ...).
        training_args: ``TrainingArguments`` to check up front: ``gradient_accumulation_steps`` must be 1 and
            ``max_grad_norm`` 0 (the Trainer's default 1.0 is refused, with the fix).
        chunk_elements: Step tensors larger than this in slices of at most this many elements (a multiple of
            4096; elementwise optimizers only), so the step's scratch is that of one slice: for the embedding and
            lm_head of a large model, gigabytes less at the peak. ``None`` (default): every tensor whole.
        clip_per_tensor: Scale each tensor's gradient to at most this norm before its step (``None``, default: no
            clipping). The fused step cannot clip by the global norm; this bounds each tensor's update against a
            gradient spike instead (the global norm may reach this times the square root of the number of tensors).
        optimizer_kwargs: The optimizer's arguments (``lr``, ``weight_decay``, ...).

    With a Trainer built by you: ``Trainer(model, args, optimizers=(optimizer_in_backward(model, lr=args.learning_rate,
    training_args=args), None))``. In a plain loop call ``optimizer.step()`` after every ``backward`` (it only marks the
    step; a second backward without it raises, as gradient accumulation would train wrongly).
    """
    trainer = None
    if _is_trainer(model):
        trainer, model = model, model.model
        training_args = trainer.args if training_args is None else training_args
        optimizer_kwargs.setdefault("lr", training_args.learning_rate)
        optimizer_kwargs.setdefault("weight_decay", training_args.weight_decay)
    if training_args is not None:
        check_optimizer_in_backward_args(training_args)
    optimizer = OptimizerInBackward(model.parameters(), optimizer_cls, chunk_elements, clip_per_tensor,
                                    **optimizer_kwargs)
    if trainer is not None:
        if trainer.optimizer is not None:
            raise ValueError(
                "This Trainer has an optimizer already; optimizer_in_backward(trainer) installs its own. Fix: create "
                "the Trainer without optimizers=..., or pass optimizers=(optimizer_in_backward(model, ...), None)."
            )
        trainer.optimizer = optimizer
    return optimizer


def _preset_bits(bits: Optional[int], offload: bool) -> int:
    """The moments' bits of the preset: as given, else 32 offloaded (torch's AdamW in host memory) and 4 otherwise."""
    if offload and bits not in (None, FP32_MOMENT_BITS):
        raise ValueError(
            f"low_memory_preset(bits={bits!r}, offload=True): the offloaded preset steps torch's AdamW (fp32 moments) "
            "in host memory, where memory is not what limits it. Fix: leave bits out (or bits=32), or use "
            "TrainingArguments(optim='adamw_torch_8bit') yourself with HFTConfig(master_weights='fp32_offload')."
        )
    if bits is None:
        return FP32_MOMENT_BITS if offload else 4
    if bits not in PRESET_MOMENT_BITS:
        raise ValueError(
            f"low_memory_preset(bits={bits!r}): the moments are kept by torchao's 8-bit or 4-bit AdamW or by torch's "
            "AdamW in fp32. Fix: bits=8, bits=4 or bits=32."
        )
    return bits


def _optimizer_class_name(bits: int) -> str:
    return "torch.optim.AdamW" if bits == FP32_MOMENT_BITS else f"torchao.optim.{LOW_BIT_OPTIMIZERS[bits]}"


def preset_optimizer_class(bits: int) -> type[torch.optim.Optimizer]:
    """The optimizer class of the preset whose moments have ``bits`` bits (:func:`low_memory_preset`)."""
    return torch.optim.AdamW if bits == FP32_MOMENT_BITS else low_bit_adamw(bits)


_CHECKPOINTING = {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}
# What the step fused into backward needs of the Trainer (check_optimizer_in_backward_args).
_FUSED_STEP_ARGUMENTS = {"gradient_accumulation_steps": 1, "max_grad_norm": 0.0}


def low_memory_preset(bits: Optional[int] = None, *, offload: bool = False) -> dict[str, Any]:
    """The low-memory preset: the exact settings, in one place (README, "Low-memory training").

    Two forms, both fitting half of an 8B model's training on one 24 GiB GPU (README, "Memory at scale"):

    * on the accelerator (default): stochastic rounding and torchao's 4-bit AdamW (``bits=8``: 8-bit) stepped in
      backward, nothing beside the bf16 weight but the low-bit moments; it learns the new task less than default
      HFT (docs/forgetting.md);
    * ``offload=True``: default HFT's training with its masters and optimizer state in host memory: fp32 masters
      stepped there (``master_weights="fp32_offload"``) by the Trainer's own AdamW (so its global-norm clipping and
      gradient accumulation work as ever), gradient checkpointing. The accelerator keeps the bf16 weights, the
      trained half's bf16 gradients and the activations; host memory holds 12 bytes per trained parameter (fp32
      master and moments) besides the originals. Each step copies the trained gradients to the host and the
      weights back, and runs AdamW on the host's cores.

    Returns a dict:

    * ``"hft_config"``: ``HFTConfig`` fields: ``master_weights="stochastic_rounding"`` (no bytes beside the bf16
      weights; chosen by the measurements in docs/benchmarks.md, "Master values"), offloaded ``"fp32_offload"``;
    * ``"optimizer"``: ``torchao.optim.AdamW4bit`` (``bits=8``: ``AdamW8bit``; ``bits=32``, and offloaded:
      ``torch.optim.AdamW``) as ``{"class": name, "bits": bits}``;
    * ``"optimizer_in_backward"``: ``True``, the step fused into backward (:func:`optimizer_in_backward`); offloaded
      ``False`` (the step after backward, as the Trainer takes it);
    * ``"chunk_elements"``: ``2**24``, tensors beyond 16M elements (embeddings, lm_head) stepped in slices of that size
      (offloaded: ``None``);
    * ``"clip_per_tensor"``: ``1.0``, each tensor's gradient scaled to at most that norm before its step (the fused
      step's stand-in for the Trainer's global-norm clipping, which it cannot do; measured in docs/forgetting.md;
      offloaded: ``None``, the Trainer clips by the global norm);
    * ``"training_arguments"``: ``TrainingArguments`` fields: gradient checkpointing (non-reentrant), bf16, and for
      the fused step ``gradient_accumulation_steps=1`` and ``max_grad_norm=0`` (what it needs).

    Per trained parameter this keeps the bf16 weight (2 bytes) and the low-bit moments (1 byte at 4 bits, 2 at 8),
    against 16 for AdamW with fp32 masters; :func:`apply_low_memory_preset` applies it to a Trainer.
    """
    bits = _preset_bits(bits, offload)
    fused = not offload  # the on-device preset steps in backward; the offloaded one after it, as the Trainer does
    return {
        "hft_config": {"master_weights": "fp32_offload" if offload else "stochastic_rounding"},
        "optimizer": {"class": _optimizer_class_name(bits), "bits": bits},
        "optimizer_in_backward": fused,
        "chunk_elements": PRESET_CHUNK_ELEMENTS if fused else None,
        "clip_per_tensor": PRESET_CLIP_PER_TENSOR if fused else None,
        "training_arguments": {"bf16": True, **_CHECKPOINTING, **(_FUSED_STEP_ARGUMENTS if fused else {})},
    }


def low_memory_config(bits: Optional[int] = None, *, offload: bool = False, **fields: Any) -> HFTConfig:
    """``HFTConfig`` with the preset's fields (``fields`` override them or add others, e.g. ``ratio``, ``seed``)."""
    return HFTConfig(**{**low_memory_preset(bits, offload=offload)["hft_config"], **fields})


def apply_low_memory_preset(
    trainer: Any, bits: Optional[int] = None, *, offload: bool = False,
    clip_per_tensor: Optional[float] = PRESET_CLIP_PER_TENSOR, **optimizer_kwargs: Any
) -> torch.optim.Optimizer:
    """The preset's optimizer (low-bit AdamW fused into backward, in slices, each tensor's gradient clipped; with
    ``offload=True`` torch's AdamW after backward): installed in a Trainer whose arguments follow the preset
    (``low_memory_preset()["training_arguments"]``, checked here), e.g. an ``SFTTrainer`` given
    ``peft_config=low_memory_config()``; or, given a model, returned for a loop of your own.

    ``bits`` and ``offload`` choose the preset's form (:func:`low_memory_preset`); the model's adapter should have
    the same form's ``HFTConfig`` fields (:func:`low_memory_config` with the same arguments). Offloaded, a Trainer
    keeps its own AdamW (``trainer.create_optimizer()``: its weight-decay groups, ``optim``, global clipping),
    which steps the masters in host memory, and a checkpoint's optimizer state is loaded into host memory
    (:func:`~peft_hft.tuner.precision.load_state_into_host_memory`).
    ``clip_per_tensor=None`` steps unclipped (how the preset ran before it clipped; docs/forgetting.md measures both);
    ``optimizer_kwargs`` (``lr``, ``weight_decay``, ...) go to the optimizer, as in :func:`optimizer_in_backward`.
    """
    preset = low_memory_preset(bits, offload=offload)
    if _is_trainer(trainer):
        wrong = {
            key: getattr(trainer.args, key, None)
            for key, value in preset["training_arguments"].items()
            if key != "gradient_checkpointing_kwargs" and getattr(trainer.args, key, None) != value
        }
        if wrong:
            call = "low_memory_preset(offload=True)" if offload else "low_memory_preset()"
            raise ValueError(
                f"The Trainer's arguments differ from the low-memory preset: {wrong}. Fix: build them with "
                f"TrainingArguments(..., **{call}['training_arguments'])."
            )
    if offload:
        if clip_per_tensor != PRESET_CLIP_PER_TENSOR:
            raise ValueError(
                "The offloaded preset steps after backward and clips by the global gradient norm "
                "(TrainingArguments.max_grad_norm), not per tensor. Fix: leave clip_per_tensor out with offload=True."
            )
        if _is_trainer(trainer):
            if optimizer_kwargs:
                raise ValueError(
                    f"apply_low_memory_preset(trainer, offload=True) keeps the Trainer's own AdamW, which takes its "
                    f"settings from TrainingArguments, not {sorted(optimizer_kwargs)}. Fix: set them in the "
                    "TrainingArguments (learning_rate, weight_decay, ...)."
                )
            optimizer = trainer.create_optimizer()
        else:
            optimizer = torch.optim.AdamW([p for p in trainer.parameters() if p.requires_grad], **optimizer_kwargs)
        load_state_into_host_memory(optimizer)  # a resumed checkpoint's state goes to host memory, not the GPU
        return optimizer
    return optimizer_in_backward(trainer, preset_optimizer_class(preset["optimizer"]["bits"]),
                                 chunk_elements=preset["chunk_elements"], clip_per_tensor=clip_per_tensor,
                                 **optimizer_kwargs)
