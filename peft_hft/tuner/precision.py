"""fp32 master values for the tensors HFT trains on a bf16/fp16 model.

HFT trains the selected tensors in place. On a bf16 model an optimizer would write its updates straight into bf16
weights, and every update smaller than half a bf16 ulp (about 0.2% of the weight) rounds away: at the usual full-rank
fine-tuning rates (1e-5 to 2e-5) most of them do. This module keeps an fp32 *master value* of every trained tensor and
lets the optimizer step that instead, while the model keeps computing with (and saving, merging, disabling) its bf16
weights. The user changes nothing: the swap happens in torch's global optimizer-step hooks
(``torch.optim.optimizer.register_optimizer_step_pre_hook`` / ``..._post_hook``), which fire for every
``torch.optim.Optimizer`` (transformers' Trainer, TRL, accelerate's wrapper, bitsandbytes' optimizers):

* before the step, a trained low-precision parameter that the optimizer holds and that has a gradient gets its master
  as ``.data`` and an fp32 copy of its gradient as ``.grad``; optimizer state created during the step is fp32, and
  state that ``optimizer.load_state_dict`` cast to bf16 (torch casts state to the parameter's dtype) is upcast;
* after the step, the weight becomes ``master.to(bf16)`` and the original gradient goes back.

Masters are created at the first step that touches the tensor, so an engine that never steps our parameters with a
torch optimizer (DeepSpeed's bf16/ZeRO optimizers step their own fp32 partitions) never gets a second copy. A master
stays valid while the parameter still holds the very storage the post-hook wrote (same storage, same version
counter), or, after the ledger moved tensors (``disable_adapter`` through host memory, ``set_adapter``), while the
weight still equals the master rounded to its dtype; anything else (``set_diffs``, merges into another value, an
in-place edit under ``torch.no_grad()``) makes the next step start a fresh master from the weights.

Sharded parameters (FSDP2's DTensors, ZeRO-3's placeholders) are never given masters: their engine owns the storage.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from . import engines

LOW_PRECISION = (torch.bfloat16, torch.float16)

# Every live MasterValues; the hooks look at these only. Weak, so a model that is garbage-collected leaves nothing.
_REGISTRY: weakref.WeakSet[MasterValues] = weakref.WeakSet()
_HOOKS: list[Any] = []


@dataclass
class _Master:
    value: torch.Tensor  # fp32, on the parameter's device
    storage: Optional[StorageWeakRef] = None  # the storage the post-hook wrote into the parameter
    data_ptr: int = 0
    version: int = -1

    def remember(self, param: torch.Tensor) -> None:
        self.storage = StorageWeakRef(param.untyped_storage())
        self.data_ptr = param.data_ptr()
        self.version = param._version

    def written_by_us(self, param: torch.Tensor) -> bool:
        """Whether ``param`` still holds exactly the tensor the post-hook wrote (cheap: no data is read)."""
        return (
            self.storage is not None
            and not self.storage.expired()
            and self.data_ptr == param.data_ptr()
            and self.version == param._version
            and self.value.shape == param.shape
            and StorageWeakRef(param.untyped_storage()) == self.storage
        )

    def matches(self, param: torch.Tensor) -> bool:
        """Whether the master still describes ``param``'s value (reads the data when the cheap check fails)."""
        if self.written_by_us(param):
            return True
        if self.value.shape != param.shape:
            return False
        value = self.value if self.value.device == param.device else self.value.to(param.device)
        if torch.equal(value.to(param.dtype), param.data):
            self.value = value
            self.remember(param)
            return True
        return False


class MasterValues:
    """The fp32 masters of one ledger's trained tensors.

    The ledger is held weakly (it owns this object); its ``master_candidates(with_masters)`` names, at each step,
    the parameters that may get a master (trained, live, low-precision, masters on for their adapter) and those
    trained in low precision with masters switched off (for the warning).
    """

    def __init__(self, ledger: Any) -> None:
        self._ledger = weakref.ref(ledger)
        self._masters: dict[str, _Master] = {}
        # one entry per optimizer step in progress: (optimizer, [(name, param, low-precision grad)])
        self._in_step: list[tuple[Any, list[tuple[str, nn.Parameter, Optional[torch.Tensor]]]]] = []
        self._warned: set[str] = set()
        install_hooks()
        _REGISTRY.add(self)

    # -- reading -----------------------------------------------------------------------------------------------------

    def value(self, name: str, param: torch.Tensor) -> Optional[torch.Tensor]:
        """The fp32 master of ``name`` if it still describes the weight ``param``, else ``None``."""
        master = self._masters.get(name)
        if master is None:
            return None
        if master.matches(param):
            return master.value
        return None

    def seed(self, name: str, value: torch.Tensor, param: torch.Tensor) -> None:
        """Adopt ``value`` (fp32, e.g. base + a float32 diff just loaded) as the master of ``param`` if it rounds to
        the weight; the next optimizer step then continues from it instead of from the rounded weight."""
        master = _Master(value.to(device=param.device, dtype=torch.float32))
        if master.matches(param):
            self._masters[name] = master

    def nbytes(self) -> int:
        return sum(m.value.numel() * m.value.element_size() for m in self._masters.values())

    def names(self) -> list[str]:
        return list(self._masters)

    def drop(self, names: Optional[Iterable[str]] = None) -> None:
        """Forget the masters of ``names`` (all by default), e.g. when the ledger lets go of the tensors."""
        if names is None:
            self._masters.clear()
        else:
            for name in names:
                self._masters.pop(name, None)

    # -- the optimizer step -----------------------------------------------------------------------------------------

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=4)

    def before_step(self, optimizer: torch.optim.Optimizer, closure: bool) -> None:
        stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
        in_step = {name for _, swaps in self._in_step for name, _, _ in swaps}
        swaps = []
        ledger = self._ledger()
        if ledger is None:
            return
        candidates = ledger.master_candidates(with_masters=True)
        for name, param in candidates.items():
            if id(param) not in stepped or param.grad is None or name in in_step:
                continue
            if _is_sharded(param):
                self._warn_once(
                    "sharded",
                    f"{name} is a sharded {param.dtype} parameter (FSDP2/DTensor), so HFT keeps no fp32 master value "
                    "for it and updates smaller than half a low-precision ulp round away. Fix: keep the parameters in "
                    "float32 and let FSDP2 compute in bf16: fully_shard(..., mp_policy=MixedPrecisionPolicy("
                    "param_dtype=torch.bfloat16)) (accelerate: mixed_precision='bf16' with an fp32 model).",
                )
                continue
            if closure:
                self._warn_once(
                    "closure",
                    f"{type(optimizer).__name__}.step was given a closure, which re-runs the model during the step; "
                    "HFT's fp32 master values are not used for such steps (the model would see fp32 weights). Use an "
                    "optimizer without a closure, or load the model in float32.",
                )
                return
            if param.grad.is_sparse:
                continue
            master = self._masters.get(name)
            if master is None or not master.matches(param):
                master = _Master(param.data.float())
                self._masters[name] = master
            low_grad = param.grad
            param.data = master.value
            param.grad = low_grad.float()
            _upcast_state(optimizer.state.get(param))
            swaps.append((name, param, low_grad))
        unmastered = [p for p in ledger.master_candidates(with_masters=False).values() if id(p) in stepped]
        if unmastered:
            dtype = unmastered[0].dtype
            self._warn_once(
                "off",
                f"Training {len(unmastered)} {dtype} tensors in place without fp32 master values "
                "(HFTConfig(fp32_master_weights=False)): the optimizer writes its updates straight into "
                f"{dtype} weights and every update smaller than half an ulp (about 0.2% of the weight in bf16) "
                "rounds away; at learning rates around 1e-5 most do. Fix: HFTConfig(fp32_master_weights=True) "
                "(the default), load the model in float32, or use an engine that keeps fp32 master weights "
                "(DeepSpeed bf16/ZeRO, FSDP2 with fp32 parameters and MixedPrecisionPolicy(param_dtype=bf16)).",
            )
        self._in_step.append((optimizer, swaps))

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        for index in range(len(self._in_step) - 1, -1, -1):
            if self._in_step[index][0] is optimizer:
                _, swaps = self._in_step.pop(index)
                break
        else:
            return
        for name, param, low_grad in swaps:
            master = self._masters[name]
            master.value = param.data  # stepped in place; read back in case an optimizer replaced .data
            param.grad = None
            param.data = master.value.to(low_grad.dtype)
            param.grad = low_grad
            master.remember(param)

    def abandon_failed_steps(self, optimizer: torch.optim.Optimizer) -> None:
        """Undo the swaps of an earlier step of ``optimizer`` that raised (its post-hook never ran)."""
        while any(entry[0] is optimizer for entry in self._in_step):
            self.after_step(optimizer)


def is_low_precision(param: torch.Tensor) -> bool:
    """Whether ``param`` is a bf16/fp16 tensor, whose small updates round away without an fp32 master."""
    return param.dtype in LOW_PRECISION


def warn_if_fp16(model: nn.Module, names: Iterable[str]) -> None:
    """Warn that fp16 trained tensors do not go with ``torch.amp.GradScaler`` (``Trainer(fp16=True)``).

    The masters make the updates exact, but the gradients stay fp16 like the weights, and GradScaler refuses to
    unscale fp16 gradients, as it does for any fp16 model trained in full.
    """
    if any(model.get_parameter(name).dtype == torch.float16 for name in names):
        warnings.warn(
            "This HFT adapter trains float16 tensors. HFT keeps fp32 master values for them, but their gradients are "
            "float16, which torch.amp.GradScaler refuses (\"Attempting to unscale FP16 gradients\", e.g. with "
            "Trainer(fp16=True)). Fix: load the model in bfloat16 and train with bf16=True (no scaler needed), or "
            "load it in float32 and keep fp16=True (autocast). A plain loop without a scaler works as is.",
            stacklevel=3,
        )


def _is_sharded(param: torch.Tensor) -> bool:
    return engines.sharding_of(param) is not None


def _upcast_state(state: Optional[dict]) -> None:
    """fp32 optimizer state for a master: ``load_state_dict`` casts floating state to the parameter's (bf16) dtype."""
    if not state:
        return
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.dtype in LOW_PRECISION:
            state[key] = value.float()


def _pre_hook(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    # args holds the optimizer itself, then step's own arguments (a closure, if any)
    closure = (len(args) > 1 and args[1] is not None) or kwargs.get("closure") is not None
    for masters in list(_REGISTRY):
        masters.abandon_failed_steps(optimizer)
        masters.before_step(optimizer, closure)


def _post_hook(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    for masters in list(_REGISTRY):
        masters.after_step(optimizer)


def tracked_models() -> int:
    """How many models' masters the optimizer-step hooks look at (garbage-collected models drop out)."""
    return len(_REGISTRY)


def install_hooks() -> None:
    """Register the global optimizer-step hooks, once per process."""
    if _HOOKS:
        return
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    _HOOKS.append(register_optimizer_step_pre_hook(_pre_hook))
    _HOOKS.append(register_optimizer_step_post_hook(_post_hook))
