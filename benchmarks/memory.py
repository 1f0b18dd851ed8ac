"""Peak memory of a block of PyTorch work, on CUDA or on the CPU.

CUDA has ``torch.cuda.max_memory_allocated``. The CPU has no such counter, and the peak resident set size of a
process also counts start-up and model loading. Instead, ``PeakMemory`` samples the bytes currently allocated by
glibc's malloc (``mallinfo2``: arena plus mmapped chunks, over all threads) after every PyTorch operation, through a
``TorchDispatchMode``; the maximum is the peak to operator granularity. Sampling slows the work down, so measure
memory and time in separate runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")
    ]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def cpu_allocated_bytes() -> int:
    """Bytes currently allocated through malloc in this process (all arenas plus mmapped chunks)."""
    info = _libc.mallinfo2()
    return info.uordblks + info.hblkhd


class PeakMemory(TorchDispatchMode):
    """Context manager recording the peak allocated bytes on ``device`` while it is active.

    ``peak`` is absolute (all memory the process holds on that device), so compare variants run in the same way.
    """

    def __init__(self, device: str = "cpu") -> None:
        super().__init__()
        self.device = device
        self.peak = 0

    def _now(self) -> int:
        if self.device.startswith("cuda"):
            return torch.cuda.memory_allocated()
        return cpu_allocated_bytes()

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.peak = torch.cuda.max_memory_allocated()
            return self  # CUDA keeps its own peak; no sampling needed
        self.peak = self._now()
        return super().__enter__()

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = max(self.peak, torch.cuda.max_memory_allocated())
            return False
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self._now())
        return out
