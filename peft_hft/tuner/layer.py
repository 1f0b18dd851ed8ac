"""The HFT ledger: the one tuner layer of an HFT model.

HFT does not wrap modules. The selected tensors are trained in place, exactly as plain ``requires_grad`` freezing
would train them, so training costs no more time or accelerator memory than freezing. What PEFT needs beyond that
(diffs for saving, ``disable_adapter``, several named adapters, merge/unmerge) is kept here, in one module attached
to the model (``model.hft``):

* the *originals*: the base values of every tensor any adapter trains, kept off the accelerator by default;
* for every adapter, the *values* of its tensors while they are not in the weights.

The weights always hold ``base + sum of the diffs of the applied adapters``, where the applied adapters are the merged
ones plus, unless adapters are disabled, the active ones. Switching between states moves tensors, never recomputes
them when one adapter owns a tensor, so ``disable_adapter`` and back is bit-exact. Tensors on the same device are
handed over by reference (free); across devices (originals in host memory, weights on a GPU) they are copied, with
pinned buffers that are reused.

The module has no parameters or buffers, so it never appears in ``state_dict`` and is not moved by ``model.to``; it
follows dtype/device changes of the weights lazily instead.
"""

from __future__ import annotations

import functools
import warnings
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from tqdm.auto import tqdm

from ..format.encoding import apply_diff
from ..utils import listing
from . import engines
from .precision import MasterValues, is_low_precision

LEDGER_ATTRIBUTE = "hft"


@dataclass
class _Adapter:
    """What the ledger knows about one adapter."""

    params: tuple[str, ...]
    originals_device: str  # "cpu" or "device"
    requires_grad: bool = False
    # Values of the adapter's tensors, on the originals' device. A missing entry means "equal to the original".
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    # False while the adapter is applied and trainable: the weights may have moved away from `values`.
    values_current: bool = True
    # Gradients of the adapter's tensors, kept while the adapter is not live (so an optimizer step then cannot touch
    # the base values, and gradient accumulation survives a disable_adapter() round trip).
    grads: dict[str, Optional[torch.Tensor]] = field(default_factory=dict)
    # What keeps the small updates of the adapter's low-precision tensors while it trains (HFTConfig.master_weights,
    # see precision.py): "fp32", "fp32_offload", "kahan", "kahan8", "stochastic_rounding" or "none".
    master_weights: str = "fp32"

    @property
    def keeps_exact_values(self) -> bool:
        """Whether the adapter's low-precision tensors have an exact value beside the weight (an fp32 master or a
        compensation buffer: 2 bytes, or 1 for the value to 24 bits), which a float32 diff saves and restores."""
        return self.master_weights in ("fp32", "fp32_offload", "kahan", "kahan8")


def _one_walk(method: Callable) -> Callable:
    """Within one ledger operation the model's structure does not change, so the operation looks its parameters up in
    one walk of the model (:meth:`HFTLayer._param`) instead of one walk of the module path per lookup: a load or an
    adapter switch makes thousands of lookups, which otherwise cost as much as reading the diffs."""

    @functools.wraps(method)
    def wrapper(self: HFTLayer, *args, **kwargs):
        if self._lookup is not None:
            return method(self, *args, **kwargs)
        self._lookup = dict(self._root.named_parameters(remove_duplicate=False))
        try:
            return method(self, *args, **kwargs)
        finally:
            self._lookup = None

    return wrapper


def _atomic(method: Callable) -> Callable:
    """Undo the flag changes of a ledger method that fails (e.g. refused on a sharded model before tensors moved)."""

    @functools.wraps(method)
    def wrapper(self: HFTLayer, *args, **kwargs):
        flags = (self._disable_adapters, list(self.merged_adapters), list(self._active_adapter))
        requires_grad = {name: record.requires_grad for name, record in self.hft_adapters.items()}
        try:
            return method(self, *args, **kwargs)
        except Exception:
            self._disable_adapters, self.merged_adapters, self._active_adapter = flags
            for name, value in requires_grad.items():
                if name in self.hft_adapters:
                    self.hft_adapters[name].requires_grad = value
            raise

    return wrapper


class HFTLayer(nn.Module, BaseTunerLayer):
    """Ledger of the HFT adapters of a model (see the module docstring)."""

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ("hft_adapters",)

    def __init__(self, model: nn.Module) -> None:
        nn.Module.__init__(self)
        # A plain attribute, not a submodule: the model contains the ledger, not the other way round.
        object.__setattr__(self, "_root", model)
        self._lookup: Optional[dict[str, nn.Parameter]] = None  # parameters by name during one operation (_one_walk)
        self.hft_adapters: dict[str, _Adapter] = {}
        self._originals: dict[str, torch.Tensor] = {}
        self._applied: tuple[str, ...] = ()
        self._active_adapter: list[str] = []
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        # requires_grad of every parameter before HFT touched the model, to undo a failed first load.
        self._requires_grad_before = {name: p.requires_grad for name, p in model.named_parameters()}
        # fp32 master values of the trained low-precision tensors, stepped by the optimizer (see precision.py)
        self.masters = MasterValues(self)

    def forward(self, *args, **kwargs):  # pragma: no cover - the ledger is bookkeeping, never called
        raise RuntimeError("The HFT ledger is not a layer of the forward pass.")

    @property
    def weight(self):  # BaseTunerLayer would look for a wrapped layer; the ledger wraps none
        raise AttributeError("The HFT ledger wraps no layer and has no weight.")

    @property
    def bias(self):
        raise AttributeError("The HFT ledger wraps no layer and has no bias.")

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        """Nothing to move: HFT adds no adapter weights, and its stored tensors follow the weights lazily."""

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """False, as PEFT's query expects of a layer it cannot convert: ``peft.convert_to_lora`` converts one tuner
        layer per module, and the ledger is one layer for all of them. HFT adapters convert with
        :func:`peft_hft.ops.to_lora.convert_to_lora` (``peft-hft to-lora``) instead."""
        return False

    def extra_repr(self) -> str:
        sizes = {name: len(a.params) for name, a in self.hft_adapters.items()}
        return f"adapters={sizes}, active={self._active_adapter}, merged={self.merged_adapters}"

    # ---------------------------------------------------------------------------------------------------------------
    # Small helpers
    # ---------------------------------------------------------------------------------------------------------------

    @property
    def root(self) -> nn.Module:
        return self._root

    def _param(self, name: str) -> nn.Parameter:
        if self._lookup is not None and name in self._lookup:
            return self._lookup[name]
        return self._root.get_parameter(name)

    def touched(self) -> list[str]:
        """Every parameter name some adapter trains (the tensors the ledger keeps originals of)."""
        seen: dict[str, None] = {}
        for adapter in self.hft_adapters.values():
            seen.update(dict.fromkeys(adapter.params))
        return list(seen)

    def _store_device(self, name: str, param: torch.Tensor) -> torch.device:
        """Where originals and parked values of ``name`` live."""
        modes = {a.originals_device for a in self.hft_adapters.values() if name in a.params}
        return param.device if "device" in modes else torch.device("cpu")

    def _to_store(self, tensor: torch.Tensor, device: torch.device, pin: bool) -> torch.Tensor:
        """A private copy of ``tensor`` on the store device (pinned host memory when feeding a GPU)."""
        if device.type == "cpu" and pin:
            out = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            out.copy_(tensor, non_blocking=False)
            return out
        return tensor.detach().to(device, copy=True)

    def original(self, name: str) -> torch.Tensor:
        """The base value of ``name``, in the parameter's current dtype, on its store device."""
        param = self._param(name)
        stored = self._originals[name]
        device = self._store_device(name, param)
        if stored.dtype != param.dtype or stored.device != device:
            stored = stored.to(device=device, dtype=param.dtype)
            self._originals[name] = stored
        return stored

    def _value(self, adapter: str, name: str) -> torch.Tensor:
        """The parked value of ``name`` for ``adapter`` (the original if the adapter never changed it)."""
        record = self.hft_adapters[adapter]
        value = record.values.get(name)
        if value is None:
            return self.original(name)
        param = self._param(name)
        device = self._store_device(name, param)
        # A value parked by reference beside the weights (see _capture) stays there.
        if value.dtype != param.dtype or value.device not in (device, param.device):
            value = value.to(device=device, dtype=param.dtype)
            record.values[name] = value
        return value

    def _contributors(self, name: str, applied: Sequence[str]) -> list[str]:
        return [a for a in applied if name in self.hft_adapters[a].params]

    def _composite(self, name: str, contributors: Sequence[str]) -> torch.Tensor:
        """``base + sum of diffs`` for several adapters changing the same tensor, summed in float32."""
        base = self.original(name)
        total = base.float().clone()
        for adapter in contributors:
            total += self._value(adapter, name).float() - base.float()
        return total.to(base.dtype)

    @staticmethod
    def _put(param: nn.Parameter, tensor: torch.Tensor) -> None:
        """Make ``tensor`` the parameter's data: by reference on the same device, else as a fresh copy.

        Never written in place, so a tensor parked elsewhere is never overwritten by accident; and it goes through
        ``.data`` so autograd's version counters are untouched (values restored before ``backward`` are exactly the
        ones the forward pass saw).
        """
        if tensor.device == param.device and tensor.dtype == param.dtype:
            param.data = tensor
        else:
            param.data = tensor.to(device=param.device, dtype=param.dtype, non_blocking=tensor.is_pinned())

    # ---------------------------------------------------------------------------------------------------------------
    # Adding and removing adapters
    # ---------------------------------------------------------------------------------------------------------------

    def add_adapter(
        self,
        adapter_name: str,
        params: Sequence[str],
        originals_device: str,
        perturb: bool = False,
        seed: int = 0,
        copy_of: Optional[str] = None,
        master_weights: str = "fp32",
        share_originals: bool = False,
    ) -> None:
        """Register ``adapter_name`` training ``params``; capture the originals it needs. Atomic on failure.

        The originals must be the whole base tensors, so the adapter has to be added before an engine shards the
        model (FSDP2's ``fully_shard``, ``accelerator.prepare``); a ZeRO-3 model partitioned at load time
        (``deepspeed.zero.Init``) is gathered one tensor at a time, which every rank does in the same order.
        ``perturb`` noise is drawn from ``seed`` and the adapter name, so every rank draws the same.

        With ``copy_of``, the new adapter starts from that adapter's current values instead of the base (a frozen copy
        such as the reference adapter TRL makes of a trained one); only tensors that differ from the base are stored.
        ``master_weights`` (``HFTConfig.master_weights``) says what keeps the small updates of the adapter's
        low-precision tensors while it trains (see precision.py).

        ``share_originals`` (an adapter loaded for inference) keeps a base tensor that already lies on its store
        device by reference instead of copying it: nothing writes into a frozen parameter's storage, and a tensor
        that becomes trainable later gets its own copy first (``_transition``). Loading then costs no copy of the
        base tensors. A trainable adapter copies them, so its weights stay where they are (engines may hold them).
        """
        if copy_of is not None and copy_of not in self.hft_adapters:
            raise ValueError(f"Cannot copy unknown HFT adapter {copy_of!r}; available: {sorted(self.hft_adapters)}.")
        if adapter_name in self.hft_adapters:
            raise ValueError(f"An HFT adapter named {adapter_name!r} already exists; choose another name.")
        new_originals = {}
        for name in params:
            if name in self._originals:
                continue
            param = self._param(name)
            if param.device.type == "meta":
                raise ValueError(
                    f"{name} is on the meta device, so its base value is unknown. Load the model's weights before "
                    "adding an HFT adapter (under accelerate's FSDP, set fsdp_cpu_ram_efficient_loading=false: it "
                    "loads the weights on the first process only)."
                )
            if engines.is_dtensor(param):
                raise ValueError(
                    f"{name} is already sharded ({engines.DTENSOR}), so HFT cannot capture its base value or change "
                    "which tensors train. Fix: add the HFT adapter (get_peft_model, or pass peft_config to the "
                    "trainer) before the model is sharded: before fully_shard(...) / accelerator.prepare(...)."
                )
            if perturb and engines.sharding_of(param):
                raise ValueError(
                    f"init_weights=False cannot perturb {name}: it is sharded by {engines.sharding_of(param)}. "
                    "Create the adapter before the model is sharded, or use init_weights=True."
                )
            device = param.device if originals_device == "device" else torch.device("cpu")
            full = engines.full_value(param, name, collective=True)
            if share_originals and full.device == device and engines.sharding_of(param) is None and (
                engines.owns_storage(full)
            ):
                new_originals[name] = full.detach()
            else:
                new_originals[name] = self._to_store(full, device, pin=full.is_cuda and device.type == "cpu")
        self._originals.update(new_originals)
        record = _Adapter(
            params=tuple(params), originals_device=originals_device, master_weights=master_weights
        )
        self.hft_adapters[adapter_name] = record
        if copy_of is not None:
            source = self.hft_adapters[copy_of]
            for name in params:
                if name not in source.params or (copy_of not in self._applied and name not in source.values):
                    continue  # the source holds the base value here
                value = self.current_value(copy_of, name).detach()
                if not torch.equal(value, self.original(name).to(value.device)):
                    device = self._store_device(name, self._param(name))
                    record.values[name] = value.to(device, copy=True)
        if perturb:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(adapter_name.encode()))
            for name in params:
                base = self.original(name)
                spread = base.float().std().nan_to_num(0.0).item() if base.numel() > 1 else 0.0
                scale = 0.1 * max(spread, 0.02)
                noise = torch.randn(base.shape, dtype=torch.float32, generator=generator) * scale
                record.values[name] = (base.float() + noise.to(base.device)).to(base.dtype)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.hft_adapters:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        remaining_active = [a for a in self._active_adapter if a != adapter_name]
        self.merged_adapters = [a for a in self.merged_adapters if a != adapter_name]
        self._transition(self._target_applied(remaining_active))
        record = self.hft_adapters.pop(adapter_name)
        still_used = set(self.touched())
        self.masters.drop(record.params)  # a master describes the deleted adapter's value (a tensor keeps one)
        for name in record.params:
            if name not in still_used:
                del self._originals[name]
                self._param(name).requires_grad_(False)
        if adapter_name in self._active_adapter:
            if not remaining_active and self.hft_adapters:
                remaining_active = [sorted(self.hft_adapters)[0]]
                warnings.warn(
                    f"Adapter {adapter_name} was active which is now deleted. Setting active adapter to "
                    f"{remaining_active[0]}.",
                    stacklevel=2,
                )
            self.set_adapter(remaining_active)
        self.masters.sync()

    def detach(self) -> None:
        """Forget every adapter, leaving the weights as they are now."""
        for name in self.touched():
            param = self._param(name)
            param.grad = None
            param.requires_grad_(False)
            if name in self._originals and _shares_storage(param.data, self._originals[name]):
                param.data = param.data.clone()
        self.hft_adapters.clear()
        self._originals.clear()
        self._applied = ()
        self.merged_adapters = []
        self.masters.release()

    def restore_requires_grad(self) -> None:
        """Give every parameter the requires_grad it had before HFT touched the model."""
        for name, param in self._root.named_parameters():
            if name in self._requires_grad_before:
                param.requires_grad_(self._requires_grad_before[name])

    # ---------------------------------------------------------------------------------------------------------------
    # The state machine
    # ---------------------------------------------------------------------------------------------------------------

    def _target_applied(self, active: Sequence[str]) -> tuple[str, ...]:
        if self._disable_adapters:
            return ()  # disabled means the base model's outputs, merged or not (as for LoRA)
        applied = list(self.merged_adapters)
        applied += [a for a in active if a not in applied]
        return tuple(a for a in applied if a in self.hft_adapters)

    @_one_walk
    def _capture(self, adapter: str, applied: Sequence[str]) -> None:
        """Park the current values of an applied adapter that may have been trained.

        Nothing is parked while an engine shards the tensors (their values are gathered when needed, and
        ``_transition`` refuses to move them). A tensor that does not own its storage (a view into an engine's flat
        buffer, as under DeepSpeed ZeRO-1/2) is parked by reference, so it goes back to that very storage.
        """
        record = self.hft_adapters[adapter]
        if record.values_current or engines.sharding_of_model(self._root, record.params, self._param):
            return
        for name in record.params:
            param = self._param(name)
            others = [a for a in self._contributors(name, applied) if a != adapter]
            device = self._store_device(name, param)
            if others:
                base = self.original(name).float()
                live = param.data.to(device).float()
                value = (live - sum(self._value(o, name).float() - base for o in others)).to(param.dtype)
                record.values[name] = value
            elif device == param.device or not engines.owns_storage(param.data):
                record.values[name] = param.data  # handed over by reference
            else:
                buffer = record.values.get(name)
                if buffer is None or buffer.shape != param.shape or buffer.dtype != param.dtype:
                    buffer = torch.empty(param.shape, dtype=param.dtype, device=device, pin_memory=param.is_cuda)
                    record.values[name] = buffer
                buffer.copy_(param.data)
        record.values_current = True

    def _holds_value(self, adapter: str, name: str) -> bool:
        """Whether ``adapter``'s value of ``name`` may differ from the original (parked, or trained in place)."""
        record = self.hft_adapters[adapter]
        return name in record.values or (adapter in self._applied and not record.values_current)

    def _changing(self, old_applied: Sequence[str], new_applied: Sequence[str]) -> list[str]:
        """Tensors whose value differs between two states; a tensor that keeps its value is never touched."""
        changing = []
        for name in self.touched():
            old = [a for a in self._contributors(name, old_applied) if self._holds_value(a, name)]
            new = [a for a in self._contributors(name, new_applied) if self._holds_value(a, name)]
            if old != new:
                changing.append(name)
        return changing

    def _check_unsharded(self, names: Sequence[str], action: str) -> None:
        """Refuse to move tensors whose storage a distributed engine owns, before anything changed."""
        engine = engines.sharding_of_model(self._root, names, self._param) if names else None
        if engine is not None:
            raise RuntimeError(
                f"Cannot {action}: the model is sharded by {engine}, which owns the storage of the tensors HFT "
                f"trains ({listing(list(names))}), so HFT cannot swap their values. disable_adapter(), "
                "set_adapter(), merge/unmerge and loading diffs into an adapter in use work on an unsharded model "
                "only (DDP and DeepSpeed ZeRO-1/2 are fine). Fix: do it before the model is sharded, or save the "
                "adapter and load it onto an unsharded model. For TRL's DPOTrainer pass an explicit ref_model (the "
                "base model), or under FSDP set DPOConfig(precompute_ref_log_probs=True), which computes the "
                "reference log-probs before FSDP shards the model. See docs/distributed.md."
            )

    @_one_walk
    def _transition(self, new_applied: tuple[str, ...], progressbar: bool = False) -> None:
        """Bring the weights to ``base + diffs of new_applied`` and set requires_grad/grads accordingly."""
        old_applied = self._applied
        changing = set(self._changing(old_applied, new_applied))
        self._check_unsharded(sorted(changing), "change which HFT adapters are applied")
        for adapter in old_applied:
            self._capture(adapter, old_applied)
        live_trainable_before = self._live_trainable(old_applied)
        live_trainable_after = self._live_trainable(new_applied)
        for name in tqdm(self.touched(), disable=not progressbar, desc="Updating HFT tensors"):
            param = self._param(name)
            if name in live_trainable_before and name not in live_trainable_after:
                self._stash_grad(name, param, live_trainable_before[name])
            new = self._contributors(name, new_applied)
            if name in changing:
                if not new:
                    target = self.original(name)
                elif len(new) == 1:
                    target = self._value(new[0], name)
                else:
                    target = self._composite(name, new)
                self._put(param, target)
            if name in live_trainable_after:
                if name in self._originals and _shares_storage(param.data, self._originals[name]):
                    param.data = param.data.clone()  # training must never write into the originals
                if name not in live_trainable_before:
                    self._restore_grad(name, param, live_trainable_after[name])
            param.requires_grad_(name in live_trainable_after)
        for adapter in new_applied:
            if self.hft_adapters[adapter].requires_grad:
                self.hft_adapters[adapter].values_current = False
        self._applied = new_applied
        self.masters.sync()

    def _live_trainable(self, applied: Sequence[str]) -> dict[str, tuple[str, ...]]:
        """Tensors that are trainable in a state, mapped to the trainable adapters that own them."""
        out: dict[str, tuple[str, ...]] = {}
        for adapter in applied:
            record = self.hft_adapters[adapter]
            if record.requires_grad and adapter in self._active_adapter:
                for name in record.params:
                    out[name] = out.get(name, ()) + (adapter,)
        return out

    def originals_bytes(self) -> dict[str, int]:
        """Bytes of the stored originals, in host memory and on accelerators."""
        out = {"host": 0, "device": 0}
        for tensor in self._originals.values():
            out["host" if tensor.device.type == "cpu" else "device"] += tensor.numel() * tensor.element_size()
        return out

    @_one_walk
    def master_modes(self) -> dict[str, tuple[nn.Parameter, str]]:
        """The live, trainable tensors (any dtype) by name, with their parameter and their adapter's
        ``master_weights`` option (the first owner's that keeps masters, if several adapters train the tensor)."""
        out = {}
        for name, owners in self._live_trainable(self._applied).items():
            modes = [self.hft_adapters[o].master_weights for o in owners]
            out[name] = (self._param(name), next((m for m in modes if m != "none"), "none"))
        return out

    def master_candidates(self, with_masters: bool = True) -> dict[str, nn.Parameter]:
        """The live, trainable low-precision tensors whose adapter keeps master values (or, with
        ``with_masters=False``, does not), by name: what the optimizer-step hooks of precision.py may swap."""
        return {
            name: param
            for name, (param, mode) in self.master_modes().items()
            if is_low_precision(param) and (mode != "none") == with_masters
        }

    def _stash_grad(self, name: str, param: nn.Parameter, owners: tuple[str, ...]) -> None:
        for owner in owners:
            self.hft_adapters[owner].grads[name] = param.grad
        param.grad = None

    def _restore_grad(self, name: str, param: nn.Parameter, owners: tuple[str, ...]) -> None:
        grads = [self.hft_adapters[o].grads.pop(name, None) for o in owners]
        param.grad = next((g for g in grads if g is not None), None)

    def refresh(self, progressbar: bool = False) -> None:
        """Re-apply the current state (after flags changed) without moving unchanged tensors."""
        self._transition(self._target_applied(self._active_adapter), progressbar=progressbar)

    # ---------------------------------------------------------------------------------------------------------------
    # BaseTunerLayer API
    # ---------------------------------------------------------------------------------------------------------------

    def _get_available_adapters(self) -> set[str]:
        return set(self.hft_adapters)

    @_atomic
    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        unknown = [a for a in adapter_names if a not in self.hft_adapters]
        if unknown:
            raise ValueError(f"Adapter(s) {unknown} not found; available: {sorted(self.hft_adapters)}.")
        old_applied = self._applied
        for adapter in old_applied:  # capture with the old flags, before they change
            self._capture(adapter, old_applied)
        for name, record in self.hft_adapters.items():
            record.requires_grad = name in adapter_names and not inference_mode
        if sum(self.hft_adapters[a].requires_grad for a in adapter_names) > 1:
            warnings.warn(
                "Several HFT adapters are active and trainable at once; their diffs are summed in the weights, so "
                "training would update their shared tensors jointly. Activate one adapter for training.",
                stacklevel=2,
            )
        self._active_adapter = list(adapter_names)
        self.refresh()

    @_atomic
    def enable_adapters(self, enabled: bool, progressbar: bool = False) -> None:
        self._disable_adapters = not enabled
        if not enabled:
            # LoRA unmerges while disabled (LoraLayer.forward) and stays unmerged afterwards: so does HFT.
            self.merged_adapters = []
        self.refresh(progressbar)

    @_atomic
    def apply_merged_only(self, progressbar: bool = False) -> None:
        """Bring the weights to ``base + diffs of the merged adapters`` only (what ``merge_and_unload`` returns)."""
        self._disable_adapters = False
        self._active_adapter = []
        self.refresh(progressbar)

    @_atomic
    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        for adapter in self._applied:
            self._capture(adapter, self._applied)
        for name in names & set(self.hft_adapters):
            self.hft_adapters[name].requires_grad = requires_grad
        self.refresh()

    @_atomic
    def merge(
        self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None, progressbar: bool = False
    ) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        unknown = [a for a in adapter_names if a not in self.hft_adapters]
        if unknown:
            raise ValueError(f"Cannot merge unknown adapter(s) {unknown}; available: {sorted(self.hft_adapters)}.")
        if safe_merge:
            self._check_finite(adapter_names)
        self.merged_adapters = self.merged_adapters + [a for a in adapter_names if a not in self.merged_adapters]
        self.refresh(progressbar)

    @_atomic
    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        self.merged_adapters = []
        self.refresh()

    def _check_finite(self, adapter_names: Iterable[str]) -> None:
        for adapter in self._applied:
            self._capture(adapter, self._applied)
        for adapter in adapter_names:
            for name in self.hft_adapters[adapter].params:
                if not torch.isfinite(self._value(adapter, name)).all():
                    raise ValueError(
                        f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken "
                        f"(tensor {name} is not finite)."
                    )

    # ---------------------------------------------------------------------------------------------------------------
    # Diffs
    # ---------------------------------------------------------------------------------------------------------------

    def current_value(
        self, adapter: str, name: str, live: Optional[torch.Tensor] = None, precise: bool = False
    ) -> torch.Tensor:
        """The adapter's value of ``name`` now (from the weights, or ``live`` if given, when it is applied).

        With ``precise``, a trained low-precision tensor is read from its fp32 master (see precision.py), also in
        place of a ``live`` value that is the weight itself (PEFT's saving passes ``model.state_dict()``).
        """
        record = self.hft_adapters[adapter]
        if adapter in self._applied and (not record.values_current or live is not None):
            param = self._param(name)
            master = self.masters.value(name, param) if precise else None
            if master is not None and (live is None or _shares_storage(live, param.data)):
                live = master
            elif live is None:
                live = engines.full_value(param, name, collective=False)
            others = [a for a in self._contributors(name, self._applied) if a != adapter]
            if not others:
                return live
            base = self.original(name).float()
            return (live.to(base.device).float() - sum(self._value(o, name).float() - base for o in others)).to(
                live.dtype
            )
        return self._value(adapter, name)

    def diffs(
        self, adapter: str, dtype: Optional[torch.dtype] = None, live_values: Optional[dict[str, torch.Tensor]] = None
    ) -> dict[str, torch.Tensor]:
        """``tuned - base`` for every tensor of ``adapter``, on the CPU, in ``dtype``.

        The default ``dtype`` is float32 for the bf16/fp16 tensors of an adapter with fp32 master values or error
        buffers (the diff then carries the exact value: a reload restores the weight bit-exactly and the master or
        error buffer with it), else the tensor's own dtype. A float32 diff is taken from the exact value; a
        low-precision one from the weight the model computes
        with, which a reload reproduces except where ``weight - base`` does not fit the low precision.
        """
        out = {}
        record = self.hft_adapters[adapter]
        for name in record.params:
            live = None if live_values is None else live_values.get(name)
            base = self.original(name)
            stored = dtype or (
                torch.float32 if record.keeps_exact_values and is_low_precision(base) else base.dtype
            )
            precise = stored == torch.float32
            value = self.current_value(adapter, name, live, precise=precise).detach()
            diff = value.to("cpu").float() - base.to("cpu").float()
            out[name] = diff.to(stored).contiguous()
        return out

    @_one_walk
    def check_diffs(self, adapter: str, diffs: dict[str, torch.Tensor]) -> None:
        """Raise a ``ValueError`` if ``diffs`` do not fit ``adapter``'s tensors (names or shapes)."""
        expected = self.hft_adapters[adapter].params
        missing = [n for n in expected if n not in diffs]
        unexpected = [n for n in diffs if n not in expected]
        wrong_shape = [
            f"{n}: adapter {tuple(diffs[n].shape)} vs model {engines.full_shape(self._param(n))}"
            for n in expected
            if n in diffs and tuple(diffs[n].shape) != engines.full_shape(self._param(n))
        ]
        problems = []
        if missing:
            problems.append(f"missing diffs for {listing(missing)}")
        if unexpected:
            problems.append(f"diffs for tensors outside the adapter's selection: {listing(unexpected)}")
        if wrong_shape:
            problems.append(f"shape mismatches: {listing(wrong_shape)}")
        rows = {
            diffs[n].shape[0]
            for n in expected
            if n in diffs and diffs[n].dim() == 2 and diffs[n].shape[1:] == self._param(n).shape[1:]
            and diffs[n].shape[0] != self._param(n).shape[0]
        }
        resize_hint = (
            f" If the vocabulary was extended before training (e.g. TRL's chat_template_path added tokens), resize "
            f"the base model first: base_model.resize_token_embeddings({max(rows)})."
            if rows
            else ""
        )
        if problems:
            raise ValueError(
                f"The HFT adapter {adapter!r} does not match this model: {'; '.join(problems)}. The adapter file and "
                "adapter_config.json disagree, or the adapter was made for another base model. Fix: load it onto "
                "the base model named in adapter_config.json (base_model_name_or_path), or re-create the adapter."
                + resize_hint
            )

    @_one_walk
    def set_diffs(self, adapter: str, diffs: dict[str, torch.Tensor], consume: bool = False) -> None:
        """Give ``adapter`` the values ``base + diff`` (checked with :meth:`check_diffs` first).

        A float32 diff of a bf16/fp16 tensor carries the exact value of a trainable adapter whose masters keep exact
        values (``"fp32"``, ``"fp32_offload"``, ``"kahan"``, ``"kahan8"``): it seeds them. With ``consume`` the diffs
        are the caller's to give away (tensors just read from a file): the sums are written into them instead of into
        new memory.
        """
        self.check_diffs(adapter, diffs)
        record = self.hft_adapters[adapter]
        values, precise = {}, {}
        for name, diff in diffs.items():
            base = self.original(name)
            keep_exact = diff.dtype == torch.float32 and is_low_precision(base) and record.keeps_exact_values and (
                record.requires_grad
            )
            value = apply_diff(base, diff, torch.float32 if keep_exact else base.dtype, consume_diff=consume)
            values[name] = value.to(base.dtype)
            if keep_exact:
                precise[name] = value  # the exact value: keep it
        self._store_values(adapter, values, precise)

    @_one_walk
    def set_values(
        self, adapter: str, values: dict[str, torch.Tensor], precise: Optional[dict[str, torch.Tensor]] = None
    ) -> None:
        """Give ``adapter`` the tuned ``values`` (in each tensor's dtype; names and shapes checked with
        :meth:`check_diffs`); ``precise`` optionally holds fp32 masters to seed for them."""
        self.check_diffs(adapter, values)
        self._store_values(adapter, values, precise)

    def _store_values(
        self, adapter: str, values: dict[str, torch.Tensor], precise: Optional[dict[str, torch.Tensor]]
    ) -> None:
        """:meth:`set_values` for values whose names and shapes were checked (by the caller's check_diffs)."""
        applied = self._applied
        if adapter in applied:
            self._check_unsharded(list(values), f"load diffs into the applied HFT adapter {adapter!r}")
        for a in applied:
            if a != adapter:
                self._capture(a, applied)
        record = self.hft_adapters[adapter]
        for name, value in values.items():
            base = self.original(name)
            record.values[name] = value.to(device=base.device, dtype=base.dtype)
        record.values_current = True
        if adapter in applied:
            # force a rewrite of the adapter's tensors
            self._applied = tuple(a for a in applied if a != adapter)
            self._transition(applied)
            for name, value in (precise or {}).items():
                if self._contributors(name, applied) == [adapter]:
                    self.masters.seed(name, value, self._param(name), record.master_weights)


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    if engines.is_dtensor(a) or engines.is_dtensor(b):
        return False
    return a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def find_ledger(model: nn.Module) -> Optional[HFTLayer]:
    """The HFT ledger inside ``model`` (a transformers model, an HFTModel or a PeftModel), if any."""
    for module in model.modules():
        if isinstance(module, HFTLayer):
            return module
    return None
