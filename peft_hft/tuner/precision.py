"""Master values for the tensors HFT trains on a bf16/fp16 model: what the optimizer steps instead of the weight.

HFT trains the selected tensors in place. On a bf16 model an optimizer would write its updates straight into bf16
weights, and every update smaller than half a bf16 ulp (about 0.2% of the weight) rounds away: at the usual full-rank
fine-tuning rates (1e-5 to 2e-5) most of them do. ``HFTConfig(master_weights=...)`` chooses what keeps them:

* ``"fp32"``: an fp32 *master value* of every trained tensor (4 bytes per trained element), stepped by the optimizer
  while the model keeps computing with (and saving, merging, disabling) its bf16 weights (on bf16 models the same
  values as ``"kahan"`` at twice its bytes; on fp16 models the exact choice);
* ``"fp32_offload"``: the fp32 master in host memory (pinned beside a CUDA weight), stepped there, so the
  optimizer's state (created beside the value it steps) lives in host memory too and the accelerator keeps only the
  bf16 weight and gradient: the same values and update as ``"fp32"`` (bit for bit on the CPU, where host and device
  are one), at 0 bytes of device memory per trained element, for the price of moving each trained tensor's gradient
  to the host and its weight back at every step, and of an optimizer step that runs on the host's cores
  (ZeRO-Offload's idea applied to the trained half);
* ``"kahan"`` (the default): compensated bf16, a 2-byte buffer beside every trained tensor holding what the weight
  lacks of the exact value (:func:`split_exact`): beside a bf16 weight the lower half of the fp32 value's bit pattern,
  so weight and buffer *are* the fp32 master, bit for bit but at rare ties, at half its bytes; beside an fp16 weight
  the error in fp16 (close to exact, not exactly: an error below fp16's normal range keeps a resolution of 2^-24);
* ``"kahan8"``: compensated bf16 in 1 byte, bf16 models only: an int8 beside every trained element holding the next
  8 bits of the fp32 value's pattern (:func:`split_rounded_into`), so weight and buffer are the value to 24 bits (a
  15-bit mantissa: 2^-8 of a bf16 ulp); each step's fp32 result is rounded to those 24 bits stochastically, unbiased,
  with 1/256 of the noise of ``"stochastic_rounding"`` (which costs the low-memory preset its learning on the
  forgetting benchmark; docs/forgetting.md);
* ``"stochastic_rounding"``: no buffer (0 bytes); the stepped fp32 value is rounded to bf16 up or down at random,
  with the probabilities that make the rounding unbiased, so small updates survive on average (they add noise);
* ``"none"``: the optimizer writes into the bf16 weights (updates below half an ulp are lost); for engines that keep
  fp32 master weights themselves.

The user changes nothing: the swap happens in torch's global optimizer-step hooks
(``torch.optim.optimizer.register_optimizer_step_pre_hook`` / ``..._post_hook``), which fire for every
``torch.optim.Optimizer`` (transformers' Trainer, TRL, accelerate's wrapper, torchao's low-bit AdamW):

* before the step, a trained low-precision parameter that the optimizer holds and that has a gradient gets its exact
  value in fp32 as ``.data`` (the master, ``weight + error``, or the weight upcast) and an fp32 copy of its gradient as
  ``.grad``; optimizer state created during the step is fp32, and state that ``optimizer.load_state_dict`` cast to
  bf16 (torch casts state to the parameter's dtype) is upcast;
* after the step, the weight becomes the stepped value rounded to bf16 (to nearest, or stochastically), the error
  buffer keeps the remainder, and the original gradient goes back.

The fp32 copies made for a step are transient and exist for one tensor at a time: an elementwise optimizer
(:data:`ELEMENTWISE_OPTIMIZERS`: torch's AdamW, Adam, SGD, ..., torchao's low-bit AdamW) is stepped by the pre-hook
one trained tensor at a time (the optimizer's own step, restricted to that tensor: the same update, since each
element's update depends on that element alone), each tensor written back before the next one's copies are made; the
optimizer's step itself then skips them (their gradients are held back until the post-hook) and steps the rest. So
the step's peak holds one tensor's fp32 copies, not those of every trained tensor (for Llama-3-8B's default HFT
selection 17 GiB less with fp32 masters, 37 GiB less with Kahan). Other optimizers (a factored or norm-based one)
get every tensor's copies at once. The step fused into backward (:func:`peft_hft.optimizer_in_backward`) has one
optimizer per tensor (or slice), so its copies are one tensor's anyway.

The hooks are process-wide, so they are installed only while some model needs them: when a trainable adapter with
master values has low-precision tensors live, or the first gradient of such a tensor arrives (a model cast to bf16
after the adapter was added); they are removed when no such model is left (``unload``, ``delete_adapter``, garbage
collection). An fp32 model, an inference load or ``master_weights="none"`` never installs them. :func:`tracked_hooks`
and :func:`tracked_models` count them.

Masters and error buffers are created at the first step that touches the tensor, so an engine that never steps our
parameters with a torch optimizer (DeepSpeed's bf16/ZeRO optimizers step their own fp32 partitions) never gets a second
copy. They stay valid while the parameter still holds the very storage the post-hook wrote (same storage, same version
counter), or, after the ledger moved tensors (``disable_adapter`` through host memory, ``set_adapter``), while the
weight still equals the master rounded to its dtype (for an error buffer: while the weight's checksum is the one
written); anything else (``set_diffs``, merges into another value, an in-place edit under ``torch.no_grad()``) makes
the next step start afresh from the weights.

A trained tensor may also be stepped in slices (:func:`slice_parameter`; the optimizer step fused into backward
steps a large tensor one slice at a time so that the step's scratch is bounded by the slice, not by the embedding):
each slice gets its own part of the master, error buffer or rounding, written back into the tensor's own storage.

Sharded parameters (FSDP2's DTensors, ZeRO-3's placeholders) are never given masters: their engine owns the storage.
An optimizer that steps a flat buffer the trained tensors are views of (FSDP1's ``FlatParameter``, any engine that
flattens parameters into one buffer and steps it with a torch optimizer) would step around the masters; that is
detected at the step and refused.
"""

from __future__ import annotations

import itertools
import warnings
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from . import engines

LOW_PRECISION = (torch.bfloat16, torch.float16)
MASTER_WEIGHTS = ("fp32", "fp32_offload", "kahan", "kahan8", "stochastic_rounding", "none")
# What a default HFTConfig() keeps: on bf16 models the fp32 masters' values at 2 bytes per trained parameter instead
# of 4 (SmolLM2-135M, 200 steps: the same held-out loss and update; docs/benchmarks.md, "Memory options").
DEFAULT_MASTER_WEIGHTS = "kahan"
# Bytes kept per trained low-precision element between steps, by option (the 8B figures in docs/concepts.md use these).
MASTER_BYTES_PER_ELEMENT = {"fp32": 4, "fp32_offload": 4, "kahan": 2, "kahan8": 1, "stochastic_rounding": 0, "none": 0}
# The options whose master (and so the optimizer's state) lives in host memory; their bytes above are host bytes.
MASTERS_ON_HOST = frozenset({"fp32_offload"})
# The options whose master is an fp32 tensor of its own (stepped in place by the optimizer).
_FP32_MASTERS = ("fp32", "fp32_offload")
# The options that round to bfloat16 and so refuse other dtypes.
_BF16_ONLY = ("kahan8", "stochastic_rounding")

# Optimizers whose update of an element depends on that element (and its own state) alone, so that stepping one tensor
# at a time, or one slice of a tensor at a time, is the same step as stepping all of them together; a factored or
# norm-based optimizer (Adafactor, LAMB, Shampoo) is not among them.
ELEMENTWISE_OPTIMIZERS = frozenset({
    "torch.optim.adamw.AdamW", "torch.optim.adam.Adam", "torch.optim.sgd.SGD", "torch.optim.rmsprop.RMSprop",
    "torch.optim.adagrad.Adagrad", "torchao.optim.adam.AdamW8bit", "torchao.optim.adam.AdamW4bit",
    "torchao.optim.adam.AdamWFp8", "torchao.optim.adam.Adam8bit", "torchao.optim.adam.Adam4bit",
    "torchao.optim.adam.AdamFp8", "torchao.optim.adam._AdamW",
})

# The MasterValues the optimizer-step hooks look at, by token; weak, so a garbage-collected model leaves nothing.
_TRACKED: dict[int, weakref.ref] = {}
_HOOKS: list[Any] = []
_TOKENS = itertools.count()


@dataclass
class _Written:
    """Identity of the tensor the post-hook wrote into a parameter (cheap to compare: no data is read)."""

    storage: Optional[StorageWeakRef] = None
    data_ptr: int = 0
    version: int = -1
    shape: tuple = ()

    def remember(self, param: torch.Tensor) -> None:
        self.storage = StorageWeakRef(param.untyped_storage())
        self.data_ptr = param.data_ptr()
        self.version = param._version
        self.shape = tuple(param.shape)

    def written_by_us(self, param: torch.Tensor) -> bool:
        return (
            self.storage is not None
            and not self.storage.expired()
            and self.data_ptr == param.data_ptr()
            and self.version == param._version
            and self.shape == tuple(param.shape)
            and StorageWeakRef(param.untyped_storage()) == self.storage
        )


@dataclass
class _Master(_Written):
    """``"fp32"`` / ``"fp32_offload"``: the fp32 value the optimizer steps; the weight is it rounded to nearest."""

    value: Optional[torch.Tensor] = None  # fp32, on the parameter's device (in host memory when ``on_host``)
    on_host: bool = False

    def matches(self, param: torch.Tensor) -> bool:
        """Whether the master still describes ``param``'s value (reads the data when the cheap check fails)."""
        if self.written_by_us(param):
            return True
        if tuple(self.value.shape) != tuple(param.shape):
            return False
        # compared where it is to live: beside the weight, or in host memory for an offloaded master
        value = self.value if self.on_host or self.value.device == param.device else self.value.to(param.device)
        if torch.equal(value.to(param.dtype), param.data.to(value.device)):
            self.value = value
            self.remember(param)
            return True
        return False

    def exact(self, param: torch.Tensor) -> torch.Tensor:
        return self.value

    def nbytes(self) -> int:
        return self.value.numel() * self.value.element_size()


@dataclass
class _Compensation(_Written):
    """``"kahan"`` / ``"kahan8"``: what the weight lacks of the exact value (:func:`split_exact`,
    :func:`split_rounded_into`; the value is :func:`join_exact` of the weight and it)."""

    error: Optional[torch.Tensor] = None  # int16 (kahan8: int8) beside a bf16 weight, the weight's dtype beside fp16
    checksum: int = 0

    def matches(self, param: torch.Tensor) -> bool:
        if self.written_by_us(param):
            return True
        if tuple(self.error.shape) != tuple(param.shape) or self.error.dtype not in _compensation_dtypes(param.dtype):
            return False
        if _checksum(param.data) == self.checksum:
            self.error = self.error.to(param.device)
            self.remember(param)
            return True
        return False

    def exact(self, param: torch.Tensor) -> torch.Tensor:
        return join_exact(param.data, self.error)

    def nbytes(self) -> int:
        return self.error.numel() * self.error.element_size()


def _host_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """A new fp32 copy of ``tensor`` in host memory (``"fp32_offload"``), pinned when it comes from a CUDA device so
    that the copies to and from it run at full bus speed (torch caches pinned blocks, so stepping reuses them)."""
    if tensor.device.type == "cpu":
        return tensor.to(torch.float32, copy=True)
    out = torch.empty(tensor.shape, dtype=torch.float32, pin_memory=tensor.device.type == "cuda")
    out.copy_(tensor)
    return out


def _checksum(tensor: torch.Tensor) -> int:
    """Sum of the bit patterns of a 16-bit tensor: tells the weight an error buffer belongs to from another one. A
    collision would only apply an error below half an ulp to another weight, the size of plain rounding."""
    return int(tensor.detach().view(torch.int16).sum(dtype=torch.int64))


_COMPENSATION_DTYPE = {torch.bfloat16: torch.int16, torch.float16: torch.float16}


def _compensation_dtype(mode: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype of the compensation buffer of ``mode`` (``"kahan"``, ``"kahan8"``) beside a ``dtype`` weight."""
    return torch.int8 if mode == "kahan8" else _COMPENSATION_DTYPE[dtype]


def _compensation_dtypes(dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    return (_COMPENSATION_DTYPE[dtype], torch.int8) if dtype == torch.bfloat16 else (_COMPENSATION_DTYPE[dtype],)


# Elements per piece of a write-back (:func:`split_exact_into`, :func:`stochastic_round_into`): its int32 scratch is
# bounded by this piece (4 MiB), not by the tensor, so writing back a 525M-element embedding needs no 2 GiB of scratch.
WRITE_BACK_CHUNK = 1 << 20


def _pieces(*tensors: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
    """The flattened ``tensors`` (same number of elements) in aligned pieces of :data:`WRITE_BACK_CHUNK` elements."""
    flat = [t.view(-1) for t in tensors]
    for start in range(0, flat[0].numel(), WRITE_BACK_CHUNK):
        yield tuple(t[start:start + WRITE_BACK_CHUNK] for t in flat)


def split_exact(exact: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """An fp32 tensor as its weight in ``dtype`` (``exact.to(dtype)``: rounded to nearest, ties to even, as every
    other path that turns an exact value into a weight rounds: loading, merging, fp32 masters) and the 2-byte
    compensation that restores it.

    bf16 is the upper half of fp32's bit pattern, so beside a bf16 weight the compensation is the rest of the pattern:
    the fp32 pattern minus the weight's pattern shifted up, an int16, and :func:`join_exact` gives the fp32 value
    back bit for bit (fp32 masters at 2 bytes instead of 4). The one exception: an exact tie that rounding to even
    rounds down leaves +32768, one more than int16 holds; it is kept as 32767, one fp32 ulp below the tie (which still
    rounds to the weight), in one of 131072 bit patterns. Non-finite values keep their bf16 rounding (NaN stays NaN).

    Beside an fp16 weight (not a part of the fp32 pattern) the compensation is ``exact - weight`` in fp16: about 11
    bits more than the weight's.
    """
    weight = torch.empty(exact.shape, dtype=dtype, device=exact.device)
    compensation = torch.empty(exact.shape, dtype=_COMPENSATION_DTYPE[dtype], device=exact.device)
    split_exact_into(exact, weight, compensation)
    return weight, compensation


def split_exact_into(exact: torch.Tensor, weight: torch.Tensor, compensation: torch.Tensor) -> None:
    """:func:`split_exact` written into existing ``weight`` and ``compensation`` tensors (contiguous, ``exact``'s
    number of elements), piece by piece: the write-back of a stepped tensor then needs the scratch of one piece
    instead of 4 bytes per element of the tensor (and reuses the old compensation buffer)."""
    for e, w, c in _pieces(exact.contiguous(), weight, compensation):
        w.copy_(e)
        if w.dtype != torch.bfloat16:
            c.copy_(e - w.float())
            continue
        rest = w.view(torch.int16).to(torch.int32).bitwise_left_shift_(16)
        torch.sub(e.view(torch.int32), rest, out=rest)
        c.copy_(rest.clamp_(max=32767))


def split_rounded_into(exact: torch.Tensor, weight: torch.Tensor, compensation: torch.Tensor,
                       generator: Optional[torch.Generator] = None) -> None:
    """``"kahan8"``: ``exact`` (fp32) rounded to 24 bits of its pattern (sign, exponent, 15 mantissa bits), written as
    that value's nearest bf16 ``weight`` and the int8 ``compensation`` that restores the 24 bits (:func:`join_exact`):
    the rest of the pattern beside the weight's (:func:`split_exact`'s int16) in units of 2^8 fp32 ulps.

    The rounding to 24 bits is stochastic with a ``generator`` (8 random low bits added to the pattern, then cleared:
    up with probability (dropped bits) / 256, unbiased, as :func:`stochastic_round` is to bf16, with 1/256 of its
    noise), to nearest without one (loading: a float32 diff carries a value on the grid already). The weight is the
    rounded value's nearest bf16, so a float32 diff of it reloads the very weight. The rest lies in [-128, 128]
    units; the one value int8 lacks, +128 (a tie that rounding to even rounds down), is kept as 127, one unit below
    the tie, which still rounds to the weight. A finite value whose rounding would reach the non-finite range is
    truncated instead; non-finite values keep their bf16 rounding and a zero compensation. Piece by piece, as
    :func:`split_exact_into`.
    """
    for e, w, c in _pieces(exact.contiguous(), weight, compensation):
        if generator is None:
            bits = torch.full(e.shape, 128, dtype=torch.int32, device=e.device)
        else:
            bits = torch.randint(0, 256, e.shape, dtype=torch.int32, device=e.device, generator=generator)
        pattern = e.view(torch.int32)
        bits.add_(pattern).bitwise_and_(-256)  # 0xFFFFFF00
        # the rounding reached the exponent's all-ones (inf, NaN), or the value was there already: a finite value is
        # truncated instead, a non-finite one kept (the carry out of a NaN's mantissa can only start there)
        overflow = bits.bitwise_and(0x7F800000) == 0x7F800000
        if overflow.any():
            kept = pattern[overflow]
            bits[overflow] = torch.where(kept.bitwise_and(0x7F800000) == 0x7F800000, kept, kept.bitwise_and(-256))
        del overflow
        w.copy_(bits.view(torch.float32))
        rest = w.view(torch.int16).to(torch.int32).bitwise_left_shift_(16)
        torch.sub(bits, rest, out=bits)
        del rest
        c.copy_(bits.bitwise_right_shift_(8).clamp_(-128, 127))
        del bits
        finite = w.isfinite()
        if not bool(finite.all()):
            c.masked_fill_(finite.logical_not_(), 0)


def _split_compensated_into(mode: str, exact: torch.Tensor, weight: torch.Tensor, compensation: torch.Tensor,
                            generator: Optional[torch.Generator] = None) -> None:
    """``exact`` into ``weight`` and its compensation as ``mode`` keeps them: ``"kahan"`` exactly
    (:func:`split_exact_into`), ``"kahan8"`` to 24 bits (:func:`split_rounded_into`: stochastically with a
    ``generator``, to nearest without one)."""
    if mode == "kahan":
        split_exact_into(exact, weight, compensation)
    else:
        split_rounded_into(exact, weight, compensation, generator)


def join_exact(weight: torch.Tensor, compensation: torch.Tensor) -> torch.Tensor:
    """The fp32 value :func:`split_exact` (or, for an int8 compensation, :func:`split_rounded_into`) split into
    ``weight`` and ``compensation``."""
    if compensation.dtype == torch.int16:
        bits = weight.view(torch.int16).to(torch.int32).bitwise_left_shift_(16).add_(compensation)
        return bits.view(torch.float32)
    if compensation.dtype == torch.int8:
        bits = weight.view(torch.int16).to(torch.int32).bitwise_left_shift_(16)
        for b, c in _pieces(bits, compensation.contiguous()):  # the int8 widened piece by piece: bounded scratch
            b.add_(c.to(torch.int32).bitwise_left_shift_(8))
        return bits.view(torch.float32)
    return weight.float() + compensation.float()


def stochastic_round(value: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Round an fp32 tensor to bf16 up or down at random, unbiased: ``E[result] == value``.

    Adding 16 random low bits to the fp32 bit pattern and truncating rounds up with probability (dropped bits) / 2**16,
    the distance to the lower neighbour in units of a bf16 ulp (the same scheme as torchao's
    ``bf16_stochastic_round``).
    """
    out = torch.empty(value.shape, dtype=torch.bfloat16, device=value.device)
    stochastic_round_into(value, out, generator)
    return out


def stochastic_round_into(value: torch.Tensor, out: torch.Tensor, generator: Optional[torch.Generator] = None) -> None:
    """:func:`stochastic_round` written into an existing bf16 ``out``, piece by piece (bounded scratch; on the CPU
    the random bits are those of one call over the whole tensor)."""
    for v, o in _pieces(value.contiguous(), out):
        bits = torch.randint(0, 1 << 16, v.shape, dtype=torch.int32, device=v.device, generator=generator)
        bits.add_(v.view(torch.int32)).bitwise_and_(-65536)  # 0xFFFF0000: keep sign, exponent, 7 mantissa bits
        o.copy_(bits.view(torch.float32))  # exact: the low 16 bits are zero
        # what lies at or above the largest finite value (inf, NaN: every exponent bit set) is rounded to nearest
        # instead; read from the bits, since torch.isfinite allocates several temporaries per element
        overflow = bits.bitwise_and_(0x7F800000) == 0x7F800000
        if overflow.any():
            o[overflow] = v[overflow].to(torch.bfloat16)


@dataclass
class _Swap:
    """One parameter (or one slice of it) swapped for one optimizer step."""

    name: str
    param: nn.Parameter
    mode: str
    low_grad: torch.Tensor
    dtype: torch.dtype
    whole: Optional[nn.Parameter] = None  # set when ``param`` is a slice of this trained tensor
    span: tuple[int, int] = (0, 0)
    device: Optional[torch.device] = None  # where the weight lives (``"fp32_offload"`` steps it elsewhere)


_SLICE_ATTRIBUTE = "_hft_slice_of"


def slice_parameter(param: nn.Parameter, start: int, stop: int) -> nn.Parameter:
    """A parameter viewing the elements ``[start, stop)`` of ``param`` (flattened), for an optimizer that steps a large
    tensor slice by slice.

    The slice shares ``param``'s storage, so a step writes into ``param``; HFT's optimizer-step hooks recognise it
    and step its part of ``param``'s master value (or error buffer, or stochastic rounding), where any other view of a
    trained tensor would be refused as a flat buffer. Only elementwise optimizers (AdamW, SGD, torchao's low-bit
    AdamW) step slices exactly as they would step the whole tensor. :func:`refresh_slice` re-points the slice when
    ``param.data`` was replaced since (a ledger move, a load).
    """
    if not 0 <= start < stop <= param.numel():
        raise ValueError(f"slice [{start}, {stop}) does not lie in a tensor of {param.numel()} elements.")
    view = nn.Parameter(_span_of(param.data, (start, stop)), requires_grad=False)
    setattr(view, _SLICE_ATTRIBUTE, (weakref.ref(param), (start, stop)))
    return view


def refresh_slice(view: nn.Parameter) -> None:
    """Point a :func:`slice_parameter` slice at its tensor's current storage (``param.data`` may have been replaced)."""
    whole, span = _whole_of(view)
    if whole is not None:
        view.data = _span_of(whole.data, span)


def _span_of(tensor: torch.Tensor, span: tuple[int, int]) -> torch.Tensor:
    return tensor.view(-1)[span[0]:span[1]]


def _whole_of(view: torch.Tensor) -> tuple[Optional[nn.Parameter], tuple[int, int]]:
    entry = getattr(view, _SLICE_ATTRIBUTE, None)
    if entry is None:
        return None, (0, 0)
    return entry[0](), entry[1]


class MasterValues:
    """The master values (or error buffers) of one ledger's trained tensors.

    The ledger is held weakly (it owns this object); it calls :meth:`sync` whenever which tensors train changed, and
    :meth:`sync` reads ``ledger.master_modes()``: the live, trainable tensors by name with their parameter and
    option (``HFTConfig.master_weights``).
    """

    def __init__(self, ledger: Any) -> None:
        self._ledger = weakref.ref(ledger)
        self._masters: dict[str, Union[_Master, _Compensation]] = {}
        # one entry per optimizer step in progress: (optimizer, [_Swap], [(param, gradient held back)])
        self._in_step: list[tuple[Any, list[_Swap], list[tuple[nn.Parameter, Any]]]] = []
        self._warned: set[str] = set()
        self._live: dict[int, tuple[str, nn.Parameter, str]] = {}  # id(param) -> (name, param, option)
        self._grad_hooks: dict[str, tuple[nn.Parameter, Any]] = {}
        self._generators: dict[torch.device, torch.Generator] = {}
        self._token = next(_TOKENS)
        weakref.finalize(self, _untrack, self._token)

    # -- which tensors, and whether the hooks are needed --------------------------------------------------------------

    def sync(self) -> None:
        """Re-read the trained tensors from the ledger; install or release the optimizer-step hooks accordingly."""
        ledger = self._ledger()
        modes = {} if ledger is None else ledger.master_modes()
        self._live = {id(p): (name, p, mode) for name, (p, mode) in modes.items()}
        for name in [n for n in self._grad_hooks if n not in modes]:
            self._grad_hooks.pop(name)[1].remove()
        for name, (param, _) in modes.items():
            if name in self._grad_hooks and self._grad_hooks[name][0] is not param:
                self._grad_hooks.pop(name)[1].remove()
            if name not in self._grad_hooks and param.requires_grad:
                handle = param.register_post_accumulate_grad_hook(_first_gradient_hook(self, name))
                self._grad_hooks[name] = (param, handle)
        wanted = any(mode != "none" and is_low_precision(p) for p, mode in modes.values())
        if wanted:
            self._activate()
        elif not self._masters and not self._in_step:
            _untrack(self._token)

    def _activate(self) -> None:
        if self._token not in _TRACKED:
            _TRACKED[self._token] = weakref.ref(self)
            _install_hooks()

    def _first_gradient(self, name: str, param: nn.Parameter) -> None:
        """A gradient arrived: training has started (the tensors may have been cast to bf16 since :meth:`sync`)."""
        entry = self._live.get(id(param))
        if entry is None or not is_low_precision(param):
            return
        if entry[2] == "none":
            self._warn_once(
                "off",
                f"Training {param.dtype} tensors (e.g. {name}) in place without master values "
                "(HFTConfig(master_weights='none')): the optimizer writes its updates straight into "
                f"{param.dtype} weights and every update smaller than half an ulp (about 0.2% of the weight in bf16) "
                "rounds away; at learning rates around 1e-5 most do. Fix: HFTConfig(master_weights='kahan') (the "
                "default: the fp32 masters' values in 2 bytes per trained parameter) or 'fp32', load the model in "
                "float32, or use an engine that keeps fp32 master weights (DeepSpeed bf16/ZeRO, FSDP2 with fp32 "
                "parameters and MixedPrecisionPolicy(param_dtype=bf16)).",
                stacklevel=2,
            )
        else:
            self._activate()

    # -- reading -----------------------------------------------------------------------------------------------------

    def value(self, name: str, param: torch.Tensor) -> Optional[torch.Tensor]:
        """The exact (fp32) value of ``name`` if a master or error buffer still describes the weight, else ``None``."""
        master = self._masters.get(name)
        if master is None or not master.matches(param):
            return None
        return master.exact(param)

    def seed(self, name: str, value: torch.Tensor, param: torch.Tensor, mode: str = "fp32") -> None:
        """Adopt ``value`` (fp32, e.g. base + a float32 diff just loaded) as the exact value of ``param`` if it rounds
        to the weight; the next optimizer step then continues from it instead of from the rounded weight."""
        if mode in _FP32_MASTERS:
            on_host = mode == "fp32_offload"
            value = _host_fp32(value) if on_host else value.to(device=param.device, dtype=torch.float32)
            master = _Master(value=value, on_host=on_host)
            if master.matches(param):
                self._masters[name] = master
        elif mode in ("kahan", "kahan8"):
            if mode == "kahan8" and param.dtype != torch.bfloat16:
                return
            value = value.to(device=param.device, dtype=torch.float32)
            weight = torch.empty(value.shape, dtype=param.dtype, device=value.device)
            error = torch.empty(value.shape, dtype=_compensation_dtype(mode, param.dtype), device=value.device)
            _split_compensated_into(mode, value, weight, error)
            if not torch.equal(weight, param.data):
                return
            master = _Compensation(error=error, checksum=_checksum(param.data))
            master.remember(param)
            self._masters[name] = master
        else:
            return
        self._activate()

    def nbytes(self) -> int:
        return sum(m.nbytes() for m in self._masters.values())

    def names(self) -> list[str]:
        return list(self._masters)

    def drop(self, names: Optional[Iterable[str]] = None) -> None:
        """Forget the masters of ``names`` (all by default), e.g. when the ledger lets go of the tensors."""
        if names is None:
            self._masters.clear()
        else:
            for name in names:
                self._masters.pop(name, None)

    def release(self) -> None:
        """Forget everything and stop being looked at (the ledger let go of every adapter)."""
        self.drop()
        for _, handle in self._grad_hooks.values():
            handle.remove()
        self._grad_hooks.clear()
        self._live = {}
        if not self._in_step:
            _untrack(self._token)

    # -- the optimizer step -----------------------------------------------------------------------------------------

    def _warn_once(self, key: str, message: str, stacklevel: int = 4) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=stacklevel)

    def _generator(self, device: torch.device) -> torch.Generator:
        """A generator of this model's own for stochastic rounding, so that it leaves torch's global RNG alone."""
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(0)
        return self._generators[device]

    def before_step(self, optimizer: torch.optim.Optimizer, closure: bool) -> None:
        in_step = {swap.name for _, swaps, _ in self._in_step for swap in swaps}
        stepped = [p for group in optimizer.param_groups for p in group["params"]]
        slices = {id(p): _whole_of(p) for p in stepped if hasattr(p, _SLICE_ATTRIBUTE)}
        unknown = [p for p in stepped if id(p) not in self._live and id(p) not in slices]
        if unknown:  # parameters replaced since the last sync (an engine wrapped the model), or not ours at all
            self.sync()
            unknown = [p for p in unknown if id(p) not in self._live]
            self._refuse_flat_views(unknown, optimizer)
        ours = []
        for p in stepped:
            whole, span = slices.get(id(p), (None, (0, 0)))
            if whole is not None and id(whole) in self._live:
                name, _, mode = self._live[id(whole)]
                ours.append((name, p, mode, whole, span))
            elif id(p) in self._live:
                ours.append((*self._live[id(p)], None, (0, 0)))
        ready = []
        for name, param, mode, whole, span in ours:
            if mode == "none" or not is_low_precision(param) or param.grad is None or name in in_step:
                continue
            if _is_sharded(param):
                self._warn_once(
                    "sharded",
                    f"{name} is a sharded {param.dtype} parameter (FSDP2/DTensor), so HFT keeps no master value "
                    "for it and updates smaller than half a low-precision ulp round away. Fix: keep the parameters in "
                    "float32 and let FSDP2 compute in bf16: fully_shard(..., mp_policy=MixedPrecisionPolicy("
                    "param_dtype=torch.bfloat16)) (accelerate: mixed_precision='bf16' with an fp32 model).",
                )
                continue
            if closure:
                self._warn_once(
                    "closure",
                    f"{type(optimizer).__name__}.step was given a closure, which re-runs the model during the step; "
                    "HFT's master values are not used for such steps (the model would see fp32 weights). Use an "
                    "optimizer without a closure, or load the model in float32.",
                )
                return
            if param.grad.is_sparse:
                continue
            if mode in _BF16_ONLY and param.dtype != torch.bfloat16:
                raise ValueError(
                    f"HFTConfig(master_weights={mode!r}) rounds to bfloat16, but {name} is {param.dtype}. "
                    "Fix: load the model in bfloat16, or use master_weights='kahan' or 'fp32' for float16 models."
                )
            ready.append((name, param, mode, whole, span))
        if len(ready) > 1 and all(whole is None for *_, whole, _ in ready) and _steps_elementwise(optimizer):
            self._in_step.append((optimizer, [], self._step_one_at_a_time(optimizer, ready)))
        else:
            self._in_step.append((optimizer, [self._swap_in(optimizer, *item) for item in ready], []))

    def _swap_in(self, optimizer: torch.optim.Optimizer, name: str, param: nn.Parameter, mode: str,
                 whole: Optional[nn.Parameter], span: tuple[int, int]) -> _Swap:
        """Give ``param`` its exact value in fp32 as ``.data`` and an fp32 copy of its gradient as ``.grad``."""
        tensor = param if whole is None else whole
        master = self._masters.get(name)
        if master is not None and not master.matches(tensor):
            master = None
        on_host = mode == "fp32_offload"
        if mode in _FP32_MASTERS:
            if not isinstance(master, _Master) or master.on_host != on_host:
                value = _host_fp32(tensor.data) if on_host else tensor.data.float()
                master = self._masters[name] = _Master(value=value, on_host=on_host)
            exact = master.value if whole is None else _span_of(master.value, span)  # stepped in place
        elif whole is not None:  # built for the slice alone, so the step's copies are bounded by it
            weight = _span_of(whole.data, span)
            exact = weight.float() if master is None else join_exact(weight, _span_of(master.error, span))
        else:
            exact = tensor.data.float() if master is None else master.exact(tensor)
        low_grad = param.grad
        swap = _Swap(name, param, mode, low_grad, param.dtype, whole, span, param.device)
        param.data = exact
        param.grad = _host_fp32(low_grad) if on_host else low_grad.float()
        _upcast_state(optimizer.state.get(param), exact.device if on_host else None)
        return swap

    def _step_one_at_a_time(self, optimizer: torch.optim.Optimizer, ready: list) -> list[tuple[nn.Parameter, Any]]:
        """Step each tensor of ``ready`` alone (swapped in, stepped, written back, before the next one is swapped
        in), then hold its gradient back so that the optimizer's own step skips it; returns the held-back
        gradients, which the post-hook gives back."""
        held: list[tuple[nn.Parameter, Any]] = []
        try:
            for item in ready:
                swap = self._swap_in(optimizer, *item)
                try:
                    _step_alone(optimizer, swap.param)
                finally:
                    self._write_back(swap)
                held.append((swap.param, swap.param.grad))
                swap.param.grad = None
        except BaseException:
            for param, grad in held:
                param.grad = grad
            raise
        return held

    def _refuse_flat_views(self, stepped: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
        """Raise if the optimizer steps a tensor that is not one of ours but shares storage with one (a flat buffer)."""
        if not self._live or not stepped:
            return
        ours = {}
        for name, param, mode in self._live.values():
            if mode != "none" and is_low_precision(param) and not _is_sharded(param) and param.device.type != "meta":
                ours[param.untyped_storage().data_ptr()] = name
        for p in stepped:
            if id(p) in self._live or p.device.type == "meta" or _is_sharded(p):
                continue
            name = ours.get(p.untyped_storage().data_ptr())
            if name is not None:
                raise RuntimeError(
                    f"{type(optimizer).__name__} steps a {tuple(p.shape)} tensor that shares its storage with the "
                    f"HFT-trained {name}: an engine flattened the parameters into one buffer (FSDP1's FlatParameter, a "
                    "flat-parameter wrapper) and steps the buffer, so HFT's master values would be stepped around "
                    "and the updates silently lost. Fix: HFTConfig(master_weights='none') with an engine that keeps "
                    "fp32 master weights itself, fp32 parameters (FSDP2 with MixedPrecisionPolicy(param_dtype=bf16)), "
                    "or FSDP2 (fully_shard) instead of FSDP1."
                )

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        for index in range(len(self._in_step) - 1, -1, -1):
            if self._in_step[index][0] is optimizer:
                _, swaps, held = self._in_step.pop(index)
                break
        else:
            return
        for swap in swaps:
            self._write_back(swap)
        for param, grad in held:
            param.grad = grad

    def _write_back(self, swap: _Swap) -> None:
        """After ``swap``'s step: the weight becomes the stepped value rounded to its dtype (the master or error buffer
        keeps the rest), and the original gradient goes back."""
        if swap.whole is not None:
            self._write_slice(swap)
            return
        param, exact = swap.param, swap.param.data  # stepped in place; read back in case .data was replaced
        param.grad = None
        if swap.mode in _FP32_MASTERS:
            master = self._masters[swap.name]
            master.value = exact
            param.data = exact.to(device=swap.device, dtype=swap.dtype)  # "fp32_offload": back onto the accelerator
            master.remember(param)
        elif swap.mode in ("kahan", "kahan8"):
            weight = torch.empty(exact.shape, dtype=swap.dtype, device=exact.device)
            error = self._reusable_error(swap.name, exact, _compensation_dtype(swap.mode, swap.dtype))
            self._split(swap.mode, exact, weight, error)
            param.data = weight
            master = _Compensation(error=error, checksum=_checksum(weight))
            master.remember(param)
            self._masters[swap.name] = master
        else:  # stochastic_rounding
            param.data = stochastic_round(exact, self._generator(exact.device))
        param.grad = swap.low_grad

    def _split(self, mode: str, exact: torch.Tensor, weight: torch.Tensor, error: torch.Tensor) -> None:
        """Write the stepped ``exact`` value into ``weight`` and its compensation ``error`` (``"kahan8"`` rounds to
        24 bits with this model's generator)."""
        _split_compensated_into(mode, exact, weight, error, self._generator(exact.device))

    def _reusable_error(self, name: str, exact: torch.Tensor, wanted: torch.dtype) -> torch.Tensor:
        """The compensation buffer (of dtype ``wanted``) to write ``name``'s new one into: its old one when it fits
        (its content went into ``exact`` at the swap), so the write-back allocates no second buffer."""
        old = self._masters.pop(name, None)
        if (isinstance(old, _Compensation) and old.error.shape == exact.shape and old.error.dtype == wanted
                and old.error.device == exact.device and old.error.is_contiguous()):
            return old.error
        del old  # frees a buffer of another shape or kind before the new one is allocated
        return torch.empty(exact.shape, dtype=wanted, device=exact.device)

    def _write_slice(self, swap: _Swap) -> None:
        """After a slice's step: write its span of the trained tensor (and of the master or error buffer)."""
        whole, exact = swap.whole, swap.param.data
        swap.param.grad = None
        weight = _span_of(whole.data, swap.span)
        if swap.mode in _FP32_MASTERS:
            master = self._masters[swap.name]
            target = _span_of(master.value, swap.span)
            if target.data_ptr() != exact.data_ptr():
                target.copy_(exact)
            weight.copy_(exact)
            master.remember(whole)
        elif swap.mode in ("kahan", "kahan8"):
            master = self._masters.get(swap.name)
            wanted = _compensation_dtype(swap.mode, swap.dtype)
            if master is None or not master.matches(whole) or master.error.dtype != wanted:
                master = _Compensation(
                    error=torch.zeros(whole.shape, dtype=wanted, device=whole.device), checksum=_checksum(whole.data))
                self._masters[swap.name] = master
            before = _checksum(weight)
            self._split(swap.mode, exact, weight, _span_of(master.error, swap.span))
            master.checksum += _checksum(weight) - before
            master.remember(whole)
        else:  # stochastic_rounding
            stochastic_round_into(exact, weight, self._generator(exact.device))
        swap.param.data = weight
        swap.param.grad = swap.low_grad

    def abandon_failed_steps(self, optimizer: torch.optim.Optimizer) -> None:
        """Undo the swaps of an earlier step of ``optimizer`` that raised (its post-hook never ran)."""
        while any(entry[0] is optimizer for entry in self._in_step):
            self.after_step(optimizer)


def steps_elementwise(optimizer_cls: type) -> bool:
    """Whether ``optimizer_cls`` is one of :data:`ELEMENTWISE_OPTIMIZERS` (by its exact class: a subclass may step
    differently)."""
    return f"{optimizer_cls.__module__}.{optimizer_cls.__qualname__}" in ELEMENTWISE_OPTIMIZERS


def _steps_elementwise(optimizer: torch.optim.Optimizer) -> bool:
    return steps_elementwise(type(optimizer)) and _unhooked_step(optimizer) is not None


def _unhooked_step(optimizer: torch.optim.Optimizer) -> Optional[Any]:
    """The optimizer class's step without torch's hook wrapper (``Optimizer.profile_hook_step``), so that stepping one
    tensor neither re-enters these hooks nor runs the optimizer's own step hooks once per tensor."""
    step = type(optimizer).step
    return getattr(step, "__wrapped__", None) if getattr(step, "hooked", False) else None


def _step_alone(optimizer: torch.optim.Optimizer, param: nn.Parameter) -> None:
    """One step of ``optimizer`` for ``param`` alone: its param group (same dict, so schedulers' values hold),
    restricted to it."""
    group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
    groups, params = optimizer.param_groups, group["params"]
    optimizer.param_groups, group["params"] = [group], [param]
    try:
        _unhooked_step(optimizer)(optimizer)
    finally:
        optimizer.param_groups, group["params"] = groups, params


def _first_gradient_hook(masters: MasterValues, name: str):
    ref = weakref.ref(masters)

    def hook(param: torch.Tensor) -> None:
        owner = ref()
        if owner is not None:
            owner._first_gradient(name, param)

    return hook


def is_low_precision(param: torch.Tensor) -> bool:
    """Whether ``param`` is a bf16/fp16 tensor, whose small updates round away without a master value."""
    return param.dtype in LOW_PRECISION


def resolve_master_weights(master_weights: Optional[str], fp32_master_weights: Optional[bool]) -> str:
    """The option ``HFTConfig`` ends up with, from the new field and the old boolean (``master_weights`` wins)."""
    if master_weights is None:
        return {None: DEFAULT_MASTER_WEIGHTS, True: "fp32", False: "none"}[fp32_master_weights]
    if fp32_master_weights is not None and fp32_master_weights != (master_weights == "fp32"):
        warnings.warn(
            f"HFTConfig(master_weights={master_weights!r}, fp32_master_weights={fp32_master_weights}) contradict each "
            f"other; master_weights wins ({master_weights!r}). Fix: pass master_weights only (fp32_master_weights is "
            "the older spelling: True means 'fp32', False means 'none').",
            stacklevel=4,
        )
    return master_weights


def warn_if_fp16(model: nn.Module, names: Iterable[str], master_weights: str = "fp32") -> None:
    """Warn that fp16 trained tensors do not go with ``torch.amp.GradScaler`` (``Trainer(fp16=True)``); refuse
    stochastic rounding, which rounds to bf16, on fp16 tensors.

    The masters make the updates exact, but the gradients stay fp16 like the weights, and GradScaler refuses to
    unscale fp16 gradients, as it does for any fp16 model trained in full.
    """
    if any(model.get_parameter(name).dtype == torch.float16 for name in names):
        if master_weights in _BF16_ONLY:
            raise ValueError(
                f"HFTConfig(master_weights={master_weights!r}) rounds to bfloat16, but this model trains float16 "
                "tensors. Fix: load the model in bfloat16, or use master_weights='kahan' or 'fp32'."
            )
        compensation = (
            " With master_weights='kahan' (the default) the compensation of an fp16 weight is itself fp16, close to "
            "but not exactly an fp32 master (an error below fp16's normal range keeps a resolution of 2^-24); pass "
            "master_weights='fp32' for exact master values."
            if master_weights == "kahan" else ""
        )
        warnings.warn(
            "This HFT adapter trains float16 tensors. HFT keeps master values for them, but their gradients are "
            "float16, which torch.amp.GradScaler refuses (\"Attempting to unscale FP16 gradients\", e.g. with "
            "Trainer(fp16=True)). Fix: load the model in bfloat16 and train with bf16=True (no scaler needed), or "
            "load it in float32 and keep fp16=True (autocast). A plain loop without a scaler works as is."
            + compensation,
            stacklevel=3,
        )


def _is_sharded(param: torch.Tensor) -> bool:
    return engines.sharding_of(param) is not None


def _upcast_state(state: Optional[dict], device: Optional[torch.device] = None) -> None:
    """fp32 optimizer state for a master: ``load_state_dict`` casts floating state to the parameter's (bf16) dtype.
    torchao's quantized states keep their codes; only the dtype they dequantize to changes. With ``device`` (an
    ``"fp32_offload"`` master's host memory) the state is also moved there, since torch put it beside the weight;
    other masters leave every state tensor where the optimizer keeps it (AdamW's step counter stays on the CPU)."""
    if not state:
        return
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        moved = value.float() if value.dtype in LOW_PRECISION else value
        if device is not None:
            moved = moved.to(device)
        if moved is not value:
            state[key] = moved


def place_loaded_state(optimizer: torch.optim.Optimizer) -> None:
    """Move the state ``optimizer.load_state_dict`` just cast to its parameters' dtype and device beside the masters
    that live in host memory (``"fp32_offload"``), upcast to fp32, at once: left where torch put it, the state of
    every offloaded tensor would sit on the accelerator until that tensor's next step (at 8B, 34 GiB of AdamW
    moments). Called per tensor by :class:`peft_hft.OptimizerInBackward` as it loads each tensor's state."""
    for param in _offloaded_params(optimizer):
        _upcast_state(optimizer.state.get(param), torch.device("cpu"))


def _offloaded_params(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    """The parameters of ``optimizer`` whose masters live in host memory (tracked models, ``"fp32_offload"``)."""
    live = {key: entry for masters in _tracked() for key, entry in masters._live.items()}
    out = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            whole, _ = _whole_of(param)
            entry = live.get(id(param if whole is None else whole))
            if entry is not None and entry[2] in MASTERS_ON_HOST and is_low_precision(entry[1]):
                out.append(param)
    return out


def load_state_into_host_memory(optimizer: torch.optim.Optimizer) -> None:
    """Make ``optimizer.load_state_dict`` put the state of offloaded tensors (``"fp32_offload"``) in host memory.

    torch casts loaded state to each parameter's dtype and device, so a resumed checkpoint's AdamW moments would
    land on the accelerator all at once (34 GiB at 8B) before the first step moves them to the host. Through
    torch's own ``load_state_dict`` pre- and post-hooks each offloaded parameter points at an empty host tensor
    of its dtype while the state is cast (so the cast goes to host memory), and at its weight again after.
    """
    placeholders: list[tuple[nn.Parameter, torch.Tensor]] = []

    def before(opt: torch.optim.Optimizer, state_dict: dict) -> None:
        for param in _offloaded_params(opt):
            placeholders.append((param, param.data))
            param.data = torch.empty(0, dtype=param.dtype)

    def after(opt: torch.optim.Optimizer) -> None:
        while placeholders:
            param, data = placeholders.pop()
            param.data = data

    optimizer.register_load_state_dict_pre_hook(before)
    optimizer.register_load_state_dict_post_hook(after)


def _pre_hook(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    # args holds the optimizer itself, then step's own arguments (a closure, if any)
    closure = (len(args) > 1 and args[1] is not None) or kwargs.get("closure") is not None
    for masters in _tracked():
        masters.abandon_failed_steps(optimizer)
        masters.before_step(optimizer, closure)


def _post_hook(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    for masters in _tracked():
        masters.after_step(optimizer)


def _tracked() -> list[MasterValues]:
    return [m for m in (ref() for ref in list(_TRACKED.values())) if m is not None]


def tracked_models() -> int:
    """How many models' masters the optimizer-step hooks look at now (garbage-collected models drop out)."""
    return len(_tracked())


def tracked_hooks() -> int:
    """How many global optimizer-step hooks HFT has installed in this process: 2 while some model needs them, else 0."""
    return len(_HOOKS)


def _install_hooks() -> None:
    if _HOOKS:
        return
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    _HOOKS.append(register_optimizer_step_pre_hook(_pre_hook))
    _HOOKS.append(register_optimizer_step_post_hook(_post_hook))


def _untrack(token: int) -> None:
    """Stop looking at one model's masters; remove the global hooks when no model is left."""
    _TRACKED.pop(token, None)
    if not _TRACKED:
        while _HOOKS:
            _HOOKS.pop().remove()
