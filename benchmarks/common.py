"""Shared benchmark tools: timing (device events on a GPU, a monotonic clock on the CPU),
peak memory above what was live before the call, and table/JSON output.

Peak memory on the CPU: PyTorch has no CPU allocator statistics, so we read the process's
resident-set high-water mark (Linux ``VmHWM``), reset before each measured call through
``/proc/self/clear_refs``, with glibc's free heap trimmed first and every allocation over 64 KiB
served by ``mmap`` during the call, so that freed tensors leave the resident set at once; timing
runs with a 32 MiB threshold, the steady state of a training process. The figure is the peak
resident memory the call added on top of what was resident before it: inputs and weights
excluded, saved activations, gradients and temporaries included. Run the function once before
measuring. The method lives in ``lora_kernels.training.memory``, shared with the demo.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from lora_kernels.training import memory as _memory
from lora_kernels.training.env import machine_info  # noqa: F401 - re-exported for the scripts

# One method for the package (demo, CLI) and the benchmarks: see lora_kernels.training.memory.
peak_memory_bytes = _memory.peak_memory_bytes


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
    _memory.use_steady_state_malloc()
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


def provider_table(rows: Sequence[dict], baseline: str = "peft") -> str:
    """A markdown table with every provider side by side: one line per (shape, mode), one
    column per provider holding its median ms and, in parentheses, its time relative to
    ``baseline`` measured in the same run. Rows: dicts with ``mode``, ``provider``,
    ``median_ms`` and optionally ``shape``; rows without a time are left out."""
    timed = [r for r in rows if isinstance(r.get("median_ms"), (int, float))]
    providers = list(dict.fromkeys(r["provider"] for r in timed))
    cases = list(dict.fromkeys((r.get("shape", ""), r["mode"]) for r in timed))
    ms = {(r.get("shape", ""), r["mode"], r["provider"]): r["median_ms"] for r in timed}
    lines = ["| shape | mode | " + " | ".join(providers) + " |",
             "| --- | --- |" + " --- |" * len(providers)]
    for shape, mode in cases:
        base = ms.get((shape, mode, baseline))
        cells = []
        for p in providers:
            t = ms.get((shape, mode, p))
            if t is None:
                cells.append("-")
            else:
                cells.append(f"{t:.3g}" + (f" ({t / base:.2f}x)" if base else ""))
        lines.append(f"| {shape} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
