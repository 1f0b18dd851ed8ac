"""How a diff is stored: plain float diffs, the lossless step encoding, and the lossy encodings (one module).

An HFT adapter stores, for every trained tensor, enough to rebuild ``tuned`` from ``base``. Which tensors are stored
for it is the adapter's *encoding*, recorded as ``diff_encoding`` in ``adapter_config.json``:

``"float"``
    ``tuned - base`` as a float tensor (``diff_dtype``, default float32 for bf16/fp16 tensors trained with fp32
    masters: the diff then carries the master, so a trainable reload resumes from it). 4 bytes per parameter.
``"exact"`` (the default for bf16/fp16 bases)
    Lossless. After bf16/fp16 training the tuned weight is itself a bf16/fp16 number, so the update is a whole number
    of steps between neighbouring representable values (ulps). The steps are stored as int8 (``hft_diff.<attr>``,
    the tensor's shape); the few elements that moved more than 127 steps (or whose step count does not rebuild their
    bits, e.g. a sign change through zero) are stored apart: their flat indices (``.exc_idx``, int64, strictly
    increasing) and their tuned values (``.exc_val``, in the base's dtype, which is also the dtype the steps count
    in). Rebuilt values are bit-identical to the trained weights. A tensor for which this is not smaller (an fp32
    base: few updates are within 127 fp32 steps) stores its tuned values in the base dtype instead (main tensor of
    that float dtype, no exceptions). 1 byte per parameter plus 10 (bf16) per exception.
``"int8[:B]"`` / ``"int4[:B]"``
    Lossy: ``tuned - base`` quantised symmetrically per block of ``B`` consecutive elements (default 64) of the
    flattened tensor: codes (int8 in the tensor's shape; int4 packed two per byte, low nibble first, as uint8 of
    ``ceil(n/2)``) and one bf16 scale per block (``.scales``).
``"dare[:P[:SEED]]"``
    Lossy, DARE (Yu et al., 2024): each element of the diff is dropped with probability ``P`` (default 0.9, drawn
    from ``SEED`` and the tensor name) and the kept ones are rescaled by ``1/(1-P)``: their values in bf16 (main
    tensor, 1-D) and a bitmask of the kept positions (``.mask``, uint8 of ``ceil(n/8)``, least significant bit first).
``"sign"``
    Lossy, BitDelta-style (Liu et al., 2024): one sign bit per element (main tensor, packed like the mask) and a
    float32 scale per row (``.scales``: the mean absolute diff of the row; one scale for 0-d/1-d tensors).

Every encoded part lies under the diff's key, ``base_model.model.<module>.hft_diff.<attr>`` (main) and
``<that key>.<part>``. The declared shape of every tensor comes from the adapter's ``base_fingerprint`` (which records
each base tensor's shape) for encodings whose tensors do not carry it, so an encoded adapter without a fingerprint is
refused. :meth:`Encoding.check_layout` checks dtypes and shapes from the header alone; :meth:`Encoding.check_values`
checks what only the data can show (indices in range and increasing, counts that add up, finite scales and values),
once, in the reader. :func:`apply_diff` is the one place where ``base + diff`` is computed.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Optional

import torch

KINDS = ("float", "exact", "int8", "int4", "dare", "sign")
LOSSLESS = ("float", "exact")
DEFAULT_BLOCK = 64
DEFAULT_DROP = 0.9
_STEP_LIMIT = 127
_INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
_SCALE_DTYPE = torch.bfloat16


class EncodingError(ValueError):
    """An encoding name that cannot be parsed, or encoded tensors that do not decode."""


def apply_diff(
    base: torch.Tensor, diff: torch.Tensor, dtype: torch.dtype, consume: bool = False, consume_diff: bool = False
) -> torch.Tensor:
    """``base + diff`` in ``dtype``: ``(base.to(dtype).float() + diff.float()).to(dtype)``; the ledger, the streaming
    merge and the continual history all compute it here, so they agree by construction. With ``consume`` a float32
    ``base`` is added to in place (the streaming merge: the peak stays at two tensors); with ``consume_diff`` a
    float32 ``diff`` is (loading: the tensors just read from the file become the weights, no new memory is touched);
    else neither is changed. Addition commutes in IEEE arithmetic, so every variant gives the same bits."""
    if consume_diff and diff.dtype == torch.float32 and diff.device == base.device and diff.shape == base.shape:
        return diff.add_(base.to(dtype)).to(dtype)
    total = base.to(dtype).float()
    change = diff.to(total.device).float()
    if total.data_ptr() == base.data_ptr() and not consume:
        return torch.add(total, change).to(dtype)  # one pass into a new tensor, not a copy and then an add
    return total.add_(change).to(dtype)


@dataclass(frozen=True)
class Encoding:
    """A parsed ``diff_encoding`` (see the module docstring); ``spec`` is its canonical name."""

    kind: str
    block: int = DEFAULT_BLOCK
    drop: float = DEFAULT_DROP
    seed: int = 0

    @property
    def spec(self) -> str:
        if self.kind in ("int8", "int4"):
            return self.kind if self.block == DEFAULT_BLOCK else f"{self.kind}:{self.block}"
        if self.kind == "dare":
            return f"dare:{self.drop:g}" + (f":{self.seed}" if self.seed else "")
        return self.kind

    @property
    def lossless(self) -> bool:
        return self.kind in LOSSLESS

    @property
    def parts(self) -> tuple[str, ...]:
        """The auxiliary parts stored beside the main tensor."""
        return {"exact": ("exc_idx", "exc_val"), "int8": ("scales",), "int4": ("scales",), "dare": ("mask",),
                "sign": ("scales",)}.get(self.kind, ())

    @property
    def needs_declared_shape(self) -> bool:
        """True when the main tensor does not have the parameter's shape (so the fingerprint must declare it)."""
        return self.kind in ("int4", "dare", "sign")

    # -------------------------------------------------------------------------------------------------------------
    # Encoding
    # -------------------------------------------------------------------------------------------------------------

    def encode(self, name: str, base: torch.Tensor, tuned: torch.Tensor, diff: torch.Tensor) -> dict[str, torch.Tensor]:
        """The parts for one tensor (``""`` is the main tensor). ``tuned`` is the weight in the base's dtype, ``diff``
        the float32 diff (from the fp32 master when there is one: the lossy encodings start from the precise update)."""
        if self.kind == "exact":
            return _encode_exact(base, tuned)
        flat = diff.float().reshape(-1)
        if self.kind in ("int8", "int4"):
            return _encode_blockwise(flat, base.shape, self.block, 127 if self.kind == "int8" else 7, self.kind)
        if self.kind == "dare":
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
            keep = torch.rand(flat.numel(), generator=generator) >= self.drop
            values = (flat[keep] / (1.0 - self.drop)).to(torch.bfloat16)
            return {"": values.contiguous(), "mask": pack_bits(keep)}
        if self.kind == "sign":
            rows = flat.reshape(_rows(base.shape), -1)
            scales = rows.abs().mean(dim=1).float()
            return {"": pack_bits(flat >= 0), "scales": scales.contiguous()}
        raise EncodingError(f"encode() of {self.kind!r} is done by the caller (plain diffs)")

    # -------------------------------------------------------------------------------------------------------------
    # Checking (untrusted input)
    # -------------------------------------------------------------------------------------------------------------

    def check_layout(
        self, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]], shape: Optional[tuple[int, ...]]
    ) -> Optional[str]:
        """What is wrong with one tensor's parts (``part -> (dtype, shape)``, from the header), or ``None``.

        ``shape`` is the declared shape of the parameter (from the fingerprint), or ``None`` if there is none.
        """
        missing = [p for p in ("", *self.parts) if p not in layout]
        extra = [p for p in layout if p not in ("", *self.parts)]
        if missing or extra:
            names = ", ".join(repr(p or "main") for p in missing + extra)
            return f"parts {names} {'missing' if missing else 'unexpected'} for diff_encoding {self.spec!r}"
        main_dtype, main_shape = layout[""]
        if self.needs_declared_shape and shape is None:
            return f"diff_encoding {self.spec!r} needs the shapes recorded in base_fingerprint, which is absent"
        if shape is None:
            shape = main_shape
        n = math.prod(shape)

        def want(part: str, dtypes: tuple[torch.dtype, ...], expected: Optional[tuple[int, ...]]) -> Optional[str]:
            dtype, got = layout[part]
            label = f"part {part or 'main'!r}"
            if dtype not in dtypes:
                return f"{label} has dtype {str(dtype).removeprefix('torch.')}, expected " + "/".join(
                    str(d).removeprefix("torch.") for d in dtypes
                )
            if expected is not None and tuple(got) != tuple(expected):
                return f"{label} has shape {tuple(got)}, expected {tuple(expected)}"
            return None

        if self.kind == "exact":
            problem = want("", (torch.int8, *_INT_VIEW), shape) or want("exc_val", tuple(_INT_VIEW), None)
            if problem:
                return problem
            exc_shape, val_shape = layout["exc_idx"][1], layout["exc_val"][1]
            if main_dtype != torch.int8 and (math.prod(exc_shape) or math.prod(val_shape)):
                return "tuned values stored in full carry no exceptions"
            return (
                want("exc_idx", (torch.int64,), (val_shape[0],) if len(val_shape) == 1 else None)
                or (None if len(val_shape) == 1 else f"part 'exc_val' must be 1-D, has shape {tuple(val_shape)}")
                or (None if val_shape[0] <= n else f"{val_shape[0]} exceptions for a tensor of {n} elements")
            )
        if self.kind in ("int8", "int4"):
            blocks = -(-n // self.block)
            codes = want("", (torch.int8,), shape) if self.kind == "int8" else want("", (torch.uint8,), (-(-n // 2),))
            return codes or want("scales", (_SCALE_DTYPE,), (blocks,))
        if self.kind == "dare":
            return want("mask", (torch.uint8,), (-(-n // 8),)) or want("", (torch.bfloat16,), None) or (
                None if len(main_shape) == 1 and main_shape[0] <= n
                else f"part 'main' must hold at most {n} kept values as a 1-D tensor, has shape {tuple(main_shape)}"
            )
        if self.kind == "sign":
            return want("", (torch.uint8,), (-(-n // 8),)) or want("scales", (torch.float32,), (_rows(shape),))
        return None

    def check_values(self, parts: dict[str, torch.Tensor], shape: tuple[int, ...]) -> Optional[str]:
        """What the data shows to be wrong (layout already checked), or ``None``."""
        n = math.prod(shape)
        if self.kind == "exact":
            if parts[""].dtype != torch.int8:
                return None if _finite(parts[""]) else "non-finite tuned values"
            idx = parts["exc_idx"]
            if idx.numel():
                if int(idx.min()) < 0 or int(idx.max()) >= n:
                    return f"exception indices outside the tensor of {n} elements"
                if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
                    return "exception indices are not strictly increasing"
            if not _finite(parts["exc_val"]):
                return "non-finite exception values"
            # the smallest step decides it in one reduction (a comparison with -128 would write a mask per element)
            if parts[""].numel() and int(parts[""].min()) == -128:
                return "step -128 (outside the encoding's range -127..127)"
            return None
        if self.kind in ("int8", "int4"):
            scales = parts["scales"]
            if not _finite(scales) or (scales.numel() and float(scales.min()) < 0):
                return "scales that are negative or not finite"
            return None
        if self.kind == "dare":
            mask = parts["mask"]
            kept = int(_popcount(mask).sum())
            if kept != parts[""].numel():
                return f"the mask keeps {kept} elements but {parts[''].numel()} values are stored"
            if n % 8 and int(mask[-1]) >> (n % 8):
                return "mask bits set beyond the end of the tensor"
            return None if _finite(parts[""]) else "non-finite kept values"
        if self.kind == "sign":
            scales = parts["scales"]
            if not _finite(scales) or (scales.numel() and float(scales.min()) < 0):
                return "scales that are negative or not finite"
            return None
        return None if _finite(parts[""]) else "non-finite values"

    # -------------------------------------------------------------------------------------------------------------
    # Decoding
    # -------------------------------------------------------------------------------------------------------------

    def diff(self, parts: dict[str, torch.Tensor], shape: tuple[int, ...], base: Optional[torch.Tensor] = None
             ) -> torch.Tensor:
        """The float32 diff (``"exact"`` needs ``base``: its steps count from the base's bits)."""
        n = math.prod(shape)
        if self.kind == "float":
            return parts[""].float()
        if self.kind == "exact":
            if base is None:
                raise EncodingError("the 'exact' encoding stores steps from the base: decoding needs the base tensor")
            dtype = self.step_dtype(parts)
            rounded = base.to(dtype)
            return self.value(parts, shape, rounded, dtype).float() - rounded.float()
        if self.kind in ("int8", "int4"):
            codes = parts[""].reshape(-1).to(torch.int16) if self.kind == "int8" else _unpack_nibbles(parts[""], n)
            padded = torch.zeros(-(-n // self.block) * self.block, dtype=torch.float32)
            padded[:n] = codes.float()
            scaled = padded.reshape(-1, self.block) * parts["scales"].float()[:, None]
            return scaled.reshape(-1)[:n].reshape(shape)
        if self.kind == "dare":
            out = torch.zeros(n, dtype=torch.float32)
            out[unpack_bits(parts["mask"], n)] = parts[""].float()
            return out.reshape(shape)
        if self.kind == "sign":
            signs = unpack_bits(parts[""], n).reshape(_rows(shape), -1)
            scales = parts["scales"].float()[:, None]
            return torch.where(signs, scales, -scales).reshape(shape)
        raise EncodingError(f"unknown encoding {self.kind!r}")

    def step_dtype(self, parts: dict[str, torch.Tensor]) -> torch.dtype:
        """The float dtype an ``"exact"`` tensor's steps count in (that of its exceptions, or of its full values)."""
        return parts[""].dtype if parts[""].dtype.is_floating_point else parts["exc_val"].dtype

    def value(self, parts: dict[str, torch.Tensor], shape: tuple[int, ...], base: torch.Tensor, dtype: torch.dtype
              ) -> torch.Tensor:
        """The tuned tensor in ``dtype``, from ``base`` (in any dtype; ``"exact"`` is bit-exact when ``base`` has the
        dtype the steps count in, and otherwise is applied as the diff it encodes, like a float diff)."""
        if self.kind != "exact":
            return apply_diff(base, self.diff(parts, shape, base), dtype)
        step_dtype = self.step_dtype(parts)
        if base.dtype != step_dtype:
            return apply_diff(base, self.diff(parts, shape, base), dtype)
        if parts[""].dtype.is_floating_point:
            return parts[""].to(device=base.device, dtype=dtype, copy=True)
        host_base = base.to("cpu")
        bound = _magnitude(host_base)
        tuned = _from_steps(host_base, parts[""], step_dtype, finite_base=math.isfinite(bound))
        flat = tuned.reshape(-1)
        if parts["exc_idx"].numel():
            flat[parts["exc_idx"]] = parts["exc_val"]
        # 127 steps multiply a magnitude by at most (1 + 2**-mantissa_bits)**127 < e < 4: from a base within a quarter
        # of the largest finite value, only the exceptions (stored values) can be non-finite, so the scan of the
        # whole result is needed only beyond that
        safe = bound <= torch.finfo(step_dtype).max / 4 and _finite(parts["exc_val"])
        if not safe and not _finite(tuned):
            raise EncodingError("the steps lead outside the finite range of the base's dtype; the file is damaged")
        return tuned.to(device=base.device, dtype=dtype)


def parse_encoding(spec: Optional[str]) -> Encoding:
    """The :class:`Encoding` named by ``spec`` (``None``: ``"float"``, what adapters without the field hold)."""
    if spec is None:
        return Encoding("float")
    if not isinstance(spec, str):
        raise EncodingError(f"diff_encoding must be a string such as 'exact' or 'int4', got {spec!r}")
    kind, *args = spec.strip().split(":")
    usage = (
        "Use one of 'float', 'exact', 'int8[:BLOCK]', 'int4[:BLOCK]', 'dare[:DROP[:SEED]]' (e.g. 'dare:0.9'), "
        "'sign'."
    )
    try:
        if kind in ("float", "exact", "sign") and not args:
            return Encoding(kind)
        if kind in ("int8", "int4") and len(args) <= 1:
            block = int(args[0]) if args else DEFAULT_BLOCK
            if not 1 <= block <= 1 << 20 or (kind == "int4" and block % 2):
                raise ValueError(f"block size {block} out of range")
            return Encoding(kind, block=block)
        if kind == "dare" and len(args) <= 2:
            drop = float(args[0]) if args else DEFAULT_DROP
            seed = int(args[1]) if len(args) > 1 else 0
            if not 0 <= drop < 1 or seed < 0:
                raise ValueError("drop rate outside [0, 1) or negative seed")
            return Encoding("dare", drop=drop, seed=seed)
    except ValueError as exc:
        raise EncodingError(f"Invalid diff_encoding {spec!r} ({exc}). {usage}") from exc
    raise EncodingError(f"Unknown diff_encoding {spec!r}. {usage}")


def default_encoding(dtypes: set[torch.dtype], diff_dtype: Optional[str]) -> str:
    """``diff_encoding=None`` resolved: ``"exact"`` when any trained tensor is bf16/fp16 (and no ``diff_dtype`` asks
    for plain diffs), else ``"float"``."""
    if diff_dtype is None and dtypes & {torch.bfloat16, torch.float16}:
        return "exact"
    return "float"


def encoded_nbytes(parts: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in parts.values())


# ------------------------------------------------------------------------------------------------------------------
# The step encoding
# ------------------------------------------------------------------------------------------------------------------


def _ordered(bits: torch.Tensor, width: int) -> torch.Tensor:
    """Float bit patterns (as signed ints of ``width`` bits, possibly widened) mapped to integers that increase with
    the value: sign and magnitude to two's complement, ``-0`` and ``+0`` both to 0. Branch-free (a conditional
    negation by the sign mask), so it runs as a few vectorised passes."""
    sign = bits >> (width - 1)  # 0, or -1 for negative values
    return (bits & ((1 << (width - 1)) - 1)).bitwise_xor_(sign).sub_(sign)


def _unordered(order: torch.Tensor, width: int, out: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_ordered` for ``|order| < 2**(width - 1)`` (0 gives ``+0``), written into ``out`` (of the
    format's own integer width). ``order`` is a temporary of the caller and is overwritten: working in place and
    straight into ``out`` saves two passes and a copy per chunk of the step decoding."""
    sign = order >> (width - 1)
    return torch.bitwise_or(order.bitwise_xor_(sign).sub_(sign), sign.bitwise_and_(-(1 << (width - 1))), out=out)


def _steps_of(base: torch.Tensor, tuned: torch.Tensor) -> torch.Tensor:
    view = _INT_VIEW[base.dtype]
    wide = torch.int64 if view == torch.int32 else torch.int32
    width = 32 if view == torch.int32 else 16
    return _ordered(tuned.view(view).to(wide), width) - _ordered(base.view(view).to(wide), width)


def _from_steps(base: torch.Tensor, steps: torch.Tensor, dtype: torch.dtype, chunk: int = 1 << 20,
                finite_base: Optional[bool] = None) -> torch.Tensor:
    """``base`` moved by ``steps`` ulps, in chunks so that the integer temporaries stay small (the streaming merge's
    peak is then set by the tensor itself, not by copies of it). ``finite_base``: whether ``base`` is finite, if the
    caller has already scanned it (else it is scanned here).

    A finite base is moved in its own integer width: its largest magnitude leaves more than 127 steps of headroom in
    every float format, so nothing can overflow. A base holding Inf/NaN patterns is widened and clamped (out-of-range
    steps then give NaN patterns, refused by the finiteness check): the same bits either way."""
    view = _INT_VIEW[dtype]
    width = 32 if view == torch.int32 else 16
    limit = (1 << (width - 1)) - 1
    bits = base.contiguous().view(view).reshape(-1)
    narrow = _finite(bits.view(dtype)) if finite_base is None else finite_base
    work = view if narrow else (torch.int64 if view == torch.int32 else torch.int32)
    flat_steps = steps.reshape(-1)
    out = torch.empty_like(bits)
    for start in range(0, bits.numel(), chunk):
        part = slice(start, start + chunk)
        order = _ordered(bits[part].to(work), width).add_(flat_steps[part])
        if not narrow:
            order.clamp_(-limit, limit)
        _unordered(order, width, out[part])
    return out.view(dtype).reshape(base.shape)


def _encode_exact(base: torch.Tensor, tuned: torch.Tensor) -> dict[str, torch.Tensor]:
    base, tuned = base.detach().to("cpu").contiguous(), tuned.detach().to("cpu", base.dtype).contiguous()
    if base.dtype not in _INT_VIEW:
        raise EncodingError(f"the 'exact' encoding needs a float32/bfloat16/float16 base, got {base.dtype}")
    steps = _steps_of(base, tuned)
    fits = steps.abs() <= _STEP_LIMIT
    small = torch.where(fits, steps, 0).to(torch.int8)
    rebuilt = _from_steps(base, small, base.dtype)
    view = _INT_VIEW[base.dtype]
    wrong = (rebuilt.view(view) != tuned.view(view)).reshape(-1)
    idx = wrong.nonzero().reshape(-1)
    stepped_bytes = small.numel() + idx.numel() * (8 + base.element_size())
    if stepped_bytes >= tuned.numel() * tuned.element_size():
        return {"": tuned, "exc_idx": torch.empty(0, dtype=torch.int64), "exc_val": torch.empty(0, dtype=base.dtype)}
    small.reshape(-1)[idx] = 0
    return {"": small, "exc_idx": idx.to(torch.int64), "exc_val": tuned.reshape(-1)[idx].clone()}


# ------------------------------------------------------------------------------------------------------------------
# Lossy helpers
# ------------------------------------------------------------------------------------------------------------------


def _encode_blockwise(flat: torch.Tensor, shape: torch.Size, block: int, qmax: int, kind: str
                      ) -> dict[str, torch.Tensor]:
    n = flat.numel()
    padded = torch.zeros(-(-n // block) * block, dtype=torch.float32)
    padded[:n] = flat
    blocks = padded.reshape(-1, block)
    scales = (blocks.abs().amax(dim=1) / qmax).to(_SCALE_DTYPE)
    divisor = scales.float()[:, None]
    codes = torch.where(divisor > 0, torch.round(blocks / divisor.clamp_min(1e-38)), 0).clamp_(-qmax, qmax)
    codes = codes.reshape(-1)[:n].to(torch.int8)
    if kind == "int8":
        return {"": codes.reshape(shape).contiguous(), "scales": scales.contiguous()}
    nibbles = (codes.to(torch.int16) + 8).to(torch.uint8)
    if n % 2:
        nibbles = torch.cat([nibbles, torch.full((1,), 8, dtype=torch.uint8)])
    packed = nibbles[0::2] | (nibbles[1::2] << 4)
    return {"": packed.contiguous(), "scales": scales.contiguous()}


def _unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    low = (packed & 0x0F).to(torch.int16) - 8
    high = (packed >> 4).to(torch.int16) - 8
    return torch.stack([low, high], dim=1).reshape(-1)[:n]


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """A boolean tensor packed 8 to a byte (least significant bit first), as uint8 of ``ceil(n/8)``."""
    flat = bits.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, torch.zeros(pad, dtype=torch.uint8)])
    weights = (1 << torch.arange(8, dtype=torch.int32)).to(torch.uint8)
    return (flat.reshape(-1, 8) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((packed.reshape(-1, 1) >> shifts) & 1).reshape(-1)[:n].bool()


def _popcount(packed: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((packed.reshape(-1, 1) >> shifts) & 1).sum(dim=1)


def _rows(shape: tuple[int, ...]) -> int:
    return shape[0] if len(shape) >= 2 else 1


def _magnitude(tensor: torch.Tensor) -> float:
    """The largest magnitude in a float ``tensor`` (0 when empty; NaN or Inf when it holds one: both propagate
    through min/max), in one pass without a tensor-sized temporary."""
    if tensor.numel() == 0:
        return 0.0
    low, high = torch.aminmax(tensor.reshape(-1).float() if tensor.dtype == torch.float16 else tensor.reshape(-1))
    low, high = float(low), float(high)
    return math.nan if math.isnan(low) or math.isnan(high) else max(-low, high)


def _finite(tensor: torch.Tensor) -> bool:
    if tensor.numel() == 0 or not tensor.dtype.is_floating_point:
        return True
    return math.isfinite(_magnitude(tensor))


__all__ = [
    "KINDS",
    "Encoding",
    "EncodingError",
    "apply_diff",
    "default_encoding",
    "encoded_nbytes",
    "pack_bits",
    "parse_encoding",
    "unpack_bits",
]
