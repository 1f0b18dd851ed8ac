"""Small helpers shared across the package: atomic file output, dtype names, and name listings for messages.

Each exists once so that every caller writes files the same crash-safe way, parses dtype names with the same error,
and shortens long lists in error messages alike.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import shutil
import statistics
import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
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


def refuse_output_overlap(output: PathLike, inputs: Mapping[str, Optional[PathLike]]) -> None:
    """Refuse an output that is an input, lies inside one, or contains one: writing it, with or without
    ``--overwrite``, would replace, alter or delete that input. The one output guard every writing command shares.

    ``inputs`` maps a label for messages ("BASE", "ADAPTER", ...) to a file or directory; ``None`` entries (an input
    that is not on disk, such as a Hub id) are skipped.
    """
    out = Path(output).expanduser().resolve()
    for what, path in inputs.items():
        if path is None:
            continue
        path = Path(path).expanduser().resolve()
        if out == path or path in out.parents or out in path.parents:
            relation = "is" if out == path else "lies inside" if path in out.parents else "contains"
            raise ValueError(
                f"The output {output} {relation} the {what} {path}; writing it (with or without --overwrite) would "
                "replace or alter an input. Fix: choose an output path outside every input."
            )


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
    if inputs:
        refuse_output_overlap(destination, inputs)
    destination = Path(destination).expanduser().absolute()
    if destination.exists() and not overwrite:
        raise FileExistsError(f"{destination} already exists. Fix: choose another output path, or pass --overwrite.")
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
