"""What the HFT ledger needs to know about distributed training engines that own a parameter's storage.

HFT trains the selected tensors in place, so DDP, FSDP2 and DeepSpeed ZeRO see an ordinary, partially frozen model.
Two engines shard the weights themselves, and then a parameter's ``.data`` is not its value:

* FSDP2 (``torch.distributed.fsdp.fully_shard``) turns every parameter into a ``DTensor`` holding this rank's shard
  (FSDP1 keeps flat views that it re-sets on every forward);
* DeepSpeed ZeRO-3 partitions every parameter: ``param.data`` is an empty placeholder, the values live in
  ``param.ds_tensor`` on every rank and are gathered for each forward.

The ledger reads full values through :func:`full_value` (a collective: every rank must take part) and refuses to move
tensors of a sharded model (:func:`sharding_of_model`), because the engine would overwrite the move or never see it.
Nothing here imports DeepSpeed unless a ZeRO-3 parameter is actually met.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Optional

import torch
from torch import nn

ZERO3 = "DeepSpeed ZeRO-3"
FSDP2 = "FSDP2 (fully_shard)"
FSDP1 = "FSDP1 (FullyShardedDataParallel)"
DTENSOR = "DTensor sharding (FSDP2 or tensor parallelism)"

_collective_depth = 0


def _dtensor_class() -> Optional[type]:
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5
        try:
            from torch.distributed._tensor import DTensor
        except ImportError:
            return None
    return DTensor


def _fsdp_module_classes() -> tuple[tuple[type, str], ...]:
    if not torch.distributed.is_available():
        return ()
    classes = []
    try:
        from torch.distributed.fsdp import FSDPModule

        classes.append((FSDPModule, FSDP2))
    except ImportError:  # torch < 2.6
        pass
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        classes.append((FullyShardedDataParallel, FSDP1))
    except ImportError:
        pass
    return tuple(classes)


def is_zero3_param(param: torch.Tensor) -> bool:
    """A parameter managed by DeepSpeed ZeRO-3 (partitioned by ``deepspeed.zero.Init`` or ``deepspeed.initialize``)."""
    return hasattr(param, "ds_id") and hasattr(param, "ds_shape")


def is_dtensor(tensor: torch.Tensor) -> bool:
    cls = _dtensor_class()
    return cls is not None and isinstance(tensor, cls)


def sharding_of(param: torch.Tensor) -> Optional[str]:
    """The engine that shards ``param`` (a name for messages), or ``None`` for an ordinary tensor."""
    if is_zero3_param(param):
        return ZERO3
    if is_dtensor(param):
        return DTENSOR
    return None


def sharding_of_model(
    model: nn.Module, names: Sequence[str], param: Optional[Callable[[str], torch.Tensor]] = None
) -> Optional[str]:
    """The engine that owns the storage of the parameters ``names`` of ``model``, or ``None``. ``param`` looks a
    parameter up by name (default ``model.get_parameter``; the ledger passes its one-walk lookup: a load asks for
    hundreds of names, and each ``get_parameter`` walks the module path).

    Besides the parameters themselves, FSDP modules inside ``model`` count: after a forward pass FSDP2 may hold the
    *unsharded* parameters (plain tensors) in place of the DTensors, and it swaps them back on its own schedule.
    """
    lookup = param or model.get_parameter
    for name in names:
        engine = sharding_of(lookup(name))
        if engine is not None:
            return engine
    classes = _fsdp_module_classes()
    if classes:
        for module in model.modules():
            for cls, engine in classes:
                if isinstance(module, cls):
                    return engine
    return None


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The shape of the whole tensor (a DTensor reports it already; a ZeRO-3 parameter keeps it in ``ds_shape``)."""
    if is_zero3_param(param):
        return tuple(param.ds_shape)
    return tuple(param.shape)


def full_numel(param: torch.Tensor) -> int:
    if is_zero3_param(param):
        return int(param.ds_numel)
    return param.numel()


def is_full_value(value: object, param: torch.Tensor) -> bool:
    """Whether ``value`` (e.g. from a state dict) holds the whole tensor ``param``, not a shard or a placeholder."""
    return isinstance(value, torch.Tensor) and not is_dtensor(value) and tuple(value.shape) == full_shape(param)


def owns_storage(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is all of its storage. An engine's flat buffer (DeepSpeed ZeRO-1/2 keeps every trainable
    parameter as a view into one) is not: such a tensor must go back to exactly that storage, or the engine's updates
    stop reaching the model."""
    return tensor.storage_offset() == 0 and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()


@contextlib.contextmanager
def collectives_allowed() -> Iterator[None]:
    """Declare that every rank runs the enclosed code, so the ledger may gather sharded tensors (a collective).

    Saving is usually done on one rank only, where a gather would hang; outside this context the ledger raises an
    error naming the fix instead. :func:`peft_hft.integrations.distributed.save_adapter` enters it on every rank.
    """
    global _collective_depth
    _collective_depth += 1
    try:
        yield
    finally:
        _collective_depth -= 1


def in_collective() -> bool:
    return _collective_depth > 0


def full_value(param: nn.Parameter, name: str, *, collective: bool) -> torch.Tensor:
    """The whole value of ``param``: its data for an ordinary tensor, else a gathered copy.

    For a sharded parameter this is a collective that every rank must enter in the same order; ``collective`` says
    whether the caller guarantees that (injection does; saving does inside :func:`collectives_allowed`).
    """
    engine = sharding_of(param)
    if engine is None:
        return param.data
    if not (collective or in_collective()):
        raise RuntimeError(
            f"{name} is sharded by {engine}, so its value must be gathered from every process, and no gathered "
            "value was passed in. Fix: call peft_hft.integrations.distributed.save_adapter(model, path) on every "
            "process; or, on the main process only, model.save_pretrained(path, state_dict=full) with full = "
            "accelerator.get_state_dict(model) computed on every process (it is whole on the main process only). "
            "transformers' Trainer does the latter with FSDP's fsdp_state_dict_type FULL_STATE_DICT and with "
            "ZeRO-3's stage3_gather_16bit_weights_on_model_save=true."
        )
    with torch.no_grad():
        if engine == ZERO3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                return param.data.detach().clone()
        return param.data.full_tensor()
