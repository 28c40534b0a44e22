"""Shared benchmark tools: timing (device events on a GPU, a monotonic clock on the CPU),
peak memory above what was live before the call, and table/JSON output.

Peak memory on the CPU: PyTorch has no CPU allocator statistics, so we read the process's
resident-set high-water mark (Linux ``VmHWM``), reset before each measured call through
``/proc/self/clear_refs``, with glibc's free heap trimmed first and every allocation over 64 KiB
served by ``mmap`` during the call, so that freed tensors leave the resident set at once (timing
runs with a 32 MiB threshold, the steady state of a training process). The figure is the peak resident memory the
call added on top of what was resident before it: inputs and weights excluded, saved
activations, gradients and temporaries included. Run the function once before measuring.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

_M_MMAP_THRESHOLD = -3
# glibc serves allocations above its mmap threshold with fresh pages that leave the resident set
# when freed. Memory is measured at 64 KiB (freed tensors leave at once, so the high-water mark
# is the peak of live memory); time at 32 MiB, the threshold a long training process converges
# to (glibc raises it to the sizes it frees), so temporaries reuse heap pages as they would there.
_MEASURE_THRESHOLD = 64 << 10
_TIMING_THRESHOLD = 32 << 20


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _set_mmap_threshold(nbytes: int) -> None:
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, nbytes)


def _release_free_heap() -> None:
    """Hand glibc's free heap pages back to the OS, so reusing them shows in the resident set."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def peak_memory_bytes(fn: Callable[[], object], device: torch.device | str) -> int:
    """Peak memory ``fn()`` adds over what was allocated before it (bytes)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    _set_mmap_threshold(_MEASURE_THRESHOLD)
    try:
        gc.collect()
        _release_free_heap()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _proc_status_bytes("VmRSS:")
        fn()
        return max(0, _proc_status_bytes("VmHWM:") - before)
    finally:
        _set_mmap_threshold(_TIMING_THRESHOLD)


def time_ms(
    fn: Callable[[], object],
    device: torch.device | str,
    *,
    warmup: int = 3,
    reps: int = 10,
) -> dict[str, float]:
    """Median and 20/80 % quantiles of ``fn``'s run time in milliseconds.

    On a GPU this uses ``triton.testing.do_bench`` (device events); on the CPU a monotonic
    clock around each call, after ``warmup`` calls.
    """
    device = torch.device(device)
    if device.type == "cuda":
        import triton.testing

        q20, med, q80 = triton.testing.do_bench(fn, quantiles=[0.2, 0.5, 0.8], warmup=25, rep=100)
        return {"median_ms": med, "q20_ms": q20, "q80_ms": q80}
    _set_mmap_threshold(_TIMING_THRESHOLD)
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return summarize(samples)


def summarize(samples_ms: Sequence[float]) -> dict[str, float]:
    """Median and 20/80 % quantiles of a list of times in milliseconds."""
    s = sorted(samples_ms)
    q = statistics.quantiles(s, n=10, method="inclusive") if len(s) > 1 else [s[0]] * 9
    return {"median_ms": statistics.median(s), "q20_ms": q[1], "q80_ms": q[7]}


def machine_info(device: torch.device | str) -> dict[str, str]:
    """What ran the benchmark: CPU model or GPU name, versions."""
    device = torch.device(device)
    if device.type == "cuda":
        hw = torch.cuda.get_device_name(device)
    else:
        hw = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                hw = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
        except (OSError, StopIteration):
            pass
        hw = f"{hw}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    info = {"device": hw, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A fixed-width text table of ``rows`` restricted to ``columns``."""

    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    cells = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def write_json(path: str | Path, payload: dict) -> Path:
    """Write ``payload`` as indented JSON, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path
