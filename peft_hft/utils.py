"""Small helpers shared across the package: atomic file output, dtype names, name listings for messages, and the
precision policy (fp32 or bf16 autocast) chosen from the hardware.

Each exists once so that every caller writes files the same crash-safe way, parses dtype names with the same error,
shortens long lists in error messages alike, and picks the same autocast on the same machine.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import platform
import shutil
import statistics
import tempfile
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch

PathLike = Union[str, os.PathLike]

# Floating dtypes by name, as users write them in configs and on the command line (diff and output dtypes).
FLOAT_DTYPES = ("float32", "bfloat16", "float16")

TMP_MARK = ".peft-hft-tmp-"


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def float_dtype(name: Optional[str], what: str = "dtype") -> Optional[torch.dtype]:
    """The torch dtype named ``name`` (one of :data:`FLOAT_DTYPES`); ``None`` stays ``None`` ("keep the dtype")."""
    if name is None:
        return None
    if name not in FLOAT_DTYPES:
        raise ValueError(f"{what} must be None or one of {FLOAT_DTYPES}, got {name!r}.")
    return getattr(torch, name)


def torch_dtype(name: str, where: str) -> torch.dtype:
    """Any torch dtype by name (``"float32"``, ``"int8"``, ...), for names read from files; ``where`` names the file."""
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"Unknown dtype {name!r} in {where}.")
    return dtype


# --------------------------------------------------------------------------------------------------------------------
# Precision policy: which autocast training and scoring run under
# --------------------------------------------------------------------------------------------------------------------

# What a user may ask for; "auto" resolves to one of RESOLVED_PRECISIONS, and only a resolved value is ever recorded.
PRECISIONS = ("auto", "fp32", "bf16")
RESOLVED_PRECISIONS = ("fp32", "bf16")
# bf16 autocast on a CPU without bf16 instructions is emulated. Measured side by side in one process on a 2-core AVX2
# CPU (SmolLM2-135M, HFT ratio 0.5): a training step 28x slower than fp32, a forward pass 7x (docs/benchmarks.md).
EMULATED_BF16_SLOWDOWN = "7-28x"


def cpu_bf16_support() -> str:
    """How this CPU computes bf16: ``"amx"`` (x86 matrix units, AMX-BF16), ``"avx512_bf16"`` (x86 bf16 dot-product
    instructions, no matrix units), ``"native"`` (another architecture whose oneDNN reports bf16, e.g. aarch64's BF16
    extension) or ``"emulated"`` (no bf16 hardware: every bf16 operation goes through fp32 conversions).

    ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` alone is too generous on x86: it is true on every AVX-512 CPU,
    also those (Skylake, Cascade Lake) that only emulate bf16. On x86 the CPU's own feature flags decide; on other
    architectures oneDNN's check is the one torch offers.
    """
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i386", "i686", "x86"):
        amx, avx512_bf16 = (getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported",
                                                                         "_is_avx512_bf16_supported"))
        if amx is not None and avx512_bf16 is not None:
            return "amx" if _safe_probe(amx) else "avx512_bf16" if _safe_probe(avx512_bf16) else "emulated"
    return "native" if _safe_probe(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)) else "emulated"


# bf16 autocast over fp32 weights pays on a CPU only where its matrix products run much faster than fp32's: with AMX,
# or on another architecture's bf16 extension (oneDNN's word). With AVX512-BF16 alone the casts of the fp32 weights on
# every call cost more than the dot products save: measured side by side on a 2-core AVX512-BF16 Xeon (SmolLM2-135M,
# HFT ratio 0.5) in three runs, a training step 1.15-1.6x and a forward pass 1.4-1.6x slower than fp32
# (docs/benchmarks.md).
AVX512_BF16_SLOWDOWN = "1.2-1.6x"


def _safe_probe(probe: Any) -> bool:
    try:
        return bool(probe()) if probe is not None else False
    except Exception:  # a torch build without the probe's backend: no evidence of fast bf16
        return False


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a run uses and why: ``precision`` is ``"fp32"`` or ``"bf16"`` (bf16 autocast over fp32
    weights), never ``"auto"``; ``str(choice)`` is the one line a run prints."""

    precision: str
    requested: str
    device: str
    reason: str

    def __str__(self) -> str:
        return f"precision {self.precision}: {self.reason}"


def resolve_precision(requested: str = "auto", device: Union[str, torch.device, None] = None) -> PrecisionChoice:
    """Resolve a requested precision (``"auto"``, ``"fp32"`` or ``"bf16"``) on ``device`` (default: CUDA if
    available, else the CPU): the one precision policy of the package, its benchmark and its examples.

    ``"auto"`` is bf16 autocast where the hardware computes bf16 natively and fast (a CUDA GPU with
    ``torch.cuda.is_bf16_supported()``; a CPU with AMX, or another architecture's bf16 extension, see
    :func:`cpu_bf16_support`) and fp32 everywhere else: emulated bf16 is 7-28x slower than fp32 on a CPU, and with
    AVX512-BF16 alone it is still 1.2-1.6x slower. An explicit ``"bf16"`` is honoured; where it is emulated, with a
    warning that says what it costs.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"Unknown precision {requested!r}; choose one of {PRECISIONS} ('auto': from the hardware).")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = torch.device(device).type
    support = None
    if kind == "cuda":
        native, where = torch.cuda.is_available() and torch.cuda.is_bf16_supported(), "this GPU"
    elif kind == "cpu":
        support, where = cpu_bf16_support(), "this CPU"
        native = support != "emulated"
    else:  # mps, xpu, ...: no policy of ours; bf16 only when asked for
        native, where = False, f"a {kind} device"
    slower = (f"bf16 instructions (AVX512-BF16) but no AMX: bf16 autocast measured {AVX512_BF16_SLOWDOWN} slower "
              "than fp32 on such a CPU")
    if requested == "auto":
        if support == "avx512_bf16":
            return PrecisionChoice("fp32", requested, kind, f"{where} has {slower}; --precision bf16 forces it")
        if native:
            units = " (AMX)" if support == "amx" else ""
            reason = f"{where} has native bf16{units} (autocast, fp32 weights); --precision fp32 forces fp32"
            return PrecisionChoice("bf16", requested, kind, reason)
        return PrecisionChoice("fp32", requested, kind, f"{where} has no native bf16; --precision bf16 forces it")
    if requested == "bf16" and support == "avx512_bf16":
        return PrecisionChoice("bf16", requested, kind, f"as requested, but {where} has {slower}; --precision auto "
                                                        "picks fp32 here")
    if requested == "fp32" or native:
        return PrecisionChoice(requested, requested, kind, "as requested (--precision auto picks from the hardware)")
    if kind == "cpu":
        cost = (f"expected to run {EMULATED_BF16_SLOWDOWN} slower than fp32 (a training step about 28x, a forward pass "
                "about 7x, measured on a 2-core AVX2 CPU)")
    else:
        cost = "expected to run slower than fp32"
    reason = (f"as requested, but {where} has no native bf16: bf16 autocast is emulated, {cost}; --precision auto "
              "picks fp32 here")
    warnings.warn(f"precision bf16: {reason}.", UserWarning, stacklevel=2)
    return PrecisionChoice("bf16", requested, kind, reason)


def autocast(precision: str, device: Union[str, torch.device]):
    """The autocast context of a resolved ``precision`` on ``device``: bf16 autocast for ``"bf16"``, none for
    ``"fp32"``. Resolve ``"auto"`` first (:func:`resolve_precision`), so that what runs is what gets recorded."""
    if precision not in RESOLVED_PRECISIONS:
        raise ValueError(
            f"Unknown precision {precision!r}; choose one of {RESOLVED_PRECISIONS} (resolve 'auto' with "
            "peft_hft.utils.resolve_precision first)."
        )
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def listing(items: Sequence[str], limit: int = 5) -> str:
    """``"a, b, c, d, e and 7 more"``: the first ``limit`` items of a list for an error message."""
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


class OptOut:
    """A safety check a user turns off for one block (a context variable: thread- and task-local) or for a whole
    process (an environment variable, for scripts they do not control). ``peft_hft.skip_base_check`` and
    ``peft_hft.allow_non_finite`` are two of them."""

    def __init__(self, name: str, env: str) -> None:
        self.env = env
        self._inside: contextvars.ContextVar[bool] = contextvars.ContextVar(name, default=False)

    @contextlib.contextmanager
    def block(self) -> Iterator[None]:
        """Turned off inside this block."""
        token = self._inside.set(True)
        try:
            yield
        finally:
            self._inside.reset(token)

    def active(self) -> bool:
        """True inside :meth:`block`, or when the environment variable is 1/true/yes/on."""
        return self._inside.get() or os.environ.get(self.env, "").strip().lower() in ("1", "true", "yes", "on")


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file beside it and a rename: readers see all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_png(fig: Any, path: Path, dpi: int = 120) -> None:
    """Save a matplotlib figure as a PNG through a temporary file beside ``path``: a crash never leaves half a plot."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(destination: Path) -> None:
    """Delete temporary directories of earlier runs for ``destination`` whose process is gone (e.g. killed -9)."""
    prefix = f".{destination.name}{TMP_MARK}"
    if not destination.parent.is_dir():
        return
    for candidate in destination.parent.iterdir():
        if candidate.name.startswith(prefix) and candidate.is_dir():
            pid = candidate.name[len(prefix):].split("-", 1)[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(candidate, ignore_errors=True)


def refuse_output_overlap(output: PathLike, inputs: Mapping[str, Optional[PathLike]],
                          outputs: Optional[Mapping[str, PathLike]] = None) -> None:
    """Refuse an output that is an input, lies inside one, or contains one: writing it, with or without
    ``--overwrite``, would replace, alter or delete that input. The one output guard every writing command shares.

    ``inputs`` maps a label for messages ("BASE", "ADAPTER", ...) to a file or directory; ``None`` entries and paths
    that do not exist on disk (an input given as a Hub id) are skipped. ``outputs``: the command's other outputs
    (e.g. ``half-reset``'s OUT beside ``--merged``), compared whether they exist yet or not.
    """
    out = Path(output).expanduser().resolve()
    others = [(what, path, False) for what, path in inputs.items()]
    others += [(what, path, True) for what, path in (outputs or {}).items()]
    for what, path, planned in others:
        if path is None or not (planned or Path(path).expanduser().exists()):
            continue
        path = Path(path).expanduser().resolve()
        if out == path or path in out.parents or out in path.parents:
            relation = "is" if out == path else "lies inside" if path in out.parents else "contains"
            harm = "the two would be written over each other" if planned else "writing it (with or without " \
                "--overwrite) would replace or alter an input"
            raise ValueError(
                f"The output {output} {relation} the {what} {path}; {harm}. Fix: choose an output path outside "
                f"every input{' and apart from the other outputs' if planned else ''}."
            )


def check_output(destination: PathLike, overwrite: bool = False,
                 inputs: Optional[Mapping[str, Optional[PathLike]]] = None,
                 outputs: Optional[Mapping[str, PathLike]] = None) -> Path:
    """The checks of an output path that every writing command runs before it starts work: the output is none of
    its ``inputs``, lies in none and contains none (:func:`refuse_output_overlap`), and it does not exist yet unless
    ``overwrite``. Returns the absolute path. :func:`atomic_directory` runs it again when it creates the output."""
    if inputs or outputs:
        refuse_output_overlap(destination, inputs or {}, outputs)
    destination = Path(destination).expanduser().absolute()
    if destination.exists() and not overwrite:
        raise FileExistsError(f"{destination} already exists. Fix: choose another output path, or pass --overwrite.")
    return destination


@contextlib.contextmanager
def staging_directory(destination: PathLike, inside: Optional[PathLike] = None) -> Iterator[Path]:
    """A new temporary directory for ``destination``, beside it (or in ``inside``), removed when the block ends
    whatever happens: rename it into place inside the block to keep it. Its name (``.<name>.peft-hft-tmp-<pid>-...``)
    lets :func:`remove_stale_temporaries` recognise it after a crash. The one staging helper of
    :func:`atomic_directory` (replace a whole output) and ``format.writer.atomic_save`` (publish files into a
    directory that may hold others)."""
    destination = Path(destination)
    parent = Path(inside) if inside is not None else destination.parent
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}{TMP_MARK}{os.getpid()}-", dir=parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(destination: PathLike, overwrite: bool = False,
                     inputs: Optional[Mapping[str, Optional[PathLike]]] = None) -> Iterator[Path]:
    """Yield a temporary directory beside ``destination``; on success it is renamed to ``destination``.

    On any error (including ``KeyboardInterrupt``) the temporary directory is deleted and ``destination`` is left as
    it was, so no half-written output ever appears under the destination's name. ``inputs`` (label -> path) are
    checked with :func:`refuse_output_overlap` before anything is created.
    """
    destination = check_output(destination, overwrite, inputs)
    destination.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(destination)
    with staging_directory(destination) as staging:
        yield staging
        if destination.exists():
            retired = destination.parent / f".{destination.name}.peft-hft-old-{uuid.uuid4().hex[:8]}"
            os.replace(destination, retired)
            os.replace(staging, destination)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, destination)


# Two-sided 95% quantiles of Student's t by degrees of freedom (no scipy dependency); 1.96 beyond the table.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        15: 2.131, 20: 2.086, 30: 2.042}


def t95(df: int) -> float:
    """The two-sided 95% quantile of Student's t with ``df`` degrees of freedom (the next smaller tabulated df)."""
    if df < 1:
        return float("nan")
    return _T95[max(k for k in _T95 if k <= df)] if df <= 30 else 1.96


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation, count and the values themselves (benchmark reports show all four)."""
    values = list(values)
    if not values:
        return {"mean": None, "std": None, "n": 0, "values": []}
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "n": len(values), "values": values}


def mean_interval(values: Sequence[float]) -> dict[str, Any]:
    """:func:`mean_std` plus a 95% Student-t interval of the mean (``ci95``; ``None`` from fewer than two values):
    what the benchmarks report for per-seed paired differences, where 3 seeds make the normal quantile too narrow."""
    stat = mean_std(values)
    if stat["n"] < 2:
        return {**stat, "ci95": None}
    half = t95(stat["n"] - 1) * stat["std"] / stat["n"] ** 0.5
    return {**stat, "ci95": [stat["mean"] - half, stat["mean"] + half]}


def format_interval(stat: Optional[dict[str, Any]], digits: int = 1, scale: float = 1.0, signed: bool = True,
                    missing: str = "n/a") -> str:
    """``mean [low, high] (value, value, ...)`` of a :func:`mean_interval` result, times ``scale`` (the interval is
    left out when there is none; ``missing`` when there is no finite mean): the cell every benchmark table shows."""
    if not stat or stat["mean"] is None or math.isnan(stat["mean"]):
        return missing
    fmt = f"{{:{'+' if signed else ''}.{digits}f}}"
    text = fmt.format(stat["mean"] * scale)
    if stat.get("ci95") is not None:
        low, high = stat["ci95"]
        text += f" [{fmt.format(low * scale)}, {fmt.format(high * scale)}]"
    return text + " (" + ", ".join(fmt.format(v * scale) for v in stat["values"]) + ")"
