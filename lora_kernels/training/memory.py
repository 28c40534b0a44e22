"""Peak memory of a stretch of code, on the GPU (the caching allocator's statistics) or the CPU
(the process's resident-set high-water mark, Linux ``VmHWM``, reset through
``/proc/self/clear_refs``; glibc is told to serve allocations over 64 KiB by ``mmap`` so that
freed tensors leave the resident set at once). The figure is what the code added on top of what
was resident or allocated when it started. Same method as ``benchmarks/common.py``: the 64 KiB
threshold holds only while measuring; afterwards it is set to 32 MiB, the steady state a long
training process reaches, so that timing outside the measured stretch is not slowed by it.
"""

from __future__ import annotations

import ctypes
import gc
import os

import torch

_M_MMAP_THRESHOLD = -3
_MEASURE_THRESHOLD = 1 << 16  # while measuring: freed tensors leave the resident set at once
_STEADY_THRESHOLD = 32 << 20  # afterwards: glibc's steady state in a training process


def _set_mmap_threshold(nbytes: int, trim: bool = False) -> None:
    """glibc's mmap threshold; ``trim``: also hand the heap's free memory back to the system
    (memory freed under a larger threshold would otherwise be reused without showing in the
    resident set's high-water mark)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, nbytes)
        if trim:
            libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def use_steady_state_malloc() -> None:
    """Set glibc's mmap threshold to the 32 MiB a long training process converges to, so that
    timed code reuses heap pages as it would there (call before timing on the CPU)."""
    _set_mmap_threshold(_STEADY_THRESHOLD)


def peak_memory_bytes(fn, device: torch.device | str) -> int | None:
    """Peak memory ``fn()`` adds over what was live before it (bytes; None where the platform
    gives no figure)."""
    with PeakMemory(device) as pm:
        fn()
    return pm.peak_bytes


def _status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """``with PeakMemory(device) as pm: ...`` then ``pm.peak_bytes`` (None where the platform
    gives no figure, e.g. a CPU run outside Linux)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.peak_bytes: int | None = None
        self._before = 0

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
        else:
            _set_mmap_threshold(_MEASURE_THRESHOLD, trim=True)
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self._before = _status_bytes("VmRSS:")
            except OSError:
                self._before = None
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._before
        else:
            if self._before is not None and os.path.exists("/proc/self/status"):
                hwm = _status_bytes("VmHWM:")
                self.peak_bytes = None if hwm is None else max(0, hwm - self._before)
            _set_mmap_threshold(_STEADY_THRESHOLD)
