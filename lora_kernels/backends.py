"""Which backends exist, what each supports, and how one is chosen.

Three backends serve every operator:

- ``cuda``:   the compiled extension built from ``csrc/`` (CUDA tensors only).
- ``triton``: the Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).
- ``torch``:  plain PyTorch, the fallback everywhere and the test oracle.

Choice, first match wins: the ``backend=`` argument of an op, :func:`set_backend`, the
``LORA_KERNELS_BACKEND`` environment variable, else ``"auto"``. ``auto`` takes, on CUDA
tensors, the first of :data:`AUTO_ORDER` that supports the inputs *and* has passed the GPU
check (:data:`GPU_VALIDATED`); on CPU tensors, ``torch``. An explicit request that cannot serve
the inputs raises a ``ValueError`` listing every backend's reasons; an automatic fallback is
silent except for one debug log line.

Each op registers, per backend, a function ``reasons(**inputs) -> list[str]`` that says why
that backend cannot serve those inputs (empty list: it can).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable

import torch

logger = logging.getLogger("lora_kernels")

BACKENDS: tuple[str, ...] = ("cuda", "triton", "torch")
AUTO_ORDER: tuple[str, ...] = ("cuda", "triton", "torch")
ENV_VAR = "LORA_KERNELS_BACKEND"

# (op, backend) pairs that have passed benchmarks/gpu_check.sh on a real GPU. Only these are
# candidates for auto selection on CUDA tensors; an explicit request works regardless.
# Update this set only with the committed table of a GPU check (benchmarks/results/).
GPU_VALIDATED: frozenset[tuple[str, str]] = frozenset()

_chosen: str | None = None
_support: dict[str, dict[str, Callable[..., list[str]]]] = {}
_logged_fallbacks: set[tuple[str, str, str]] = set()


def set_backend(name: str | None) -> None:
    """Set the process-wide backend (``"auto"``, ``"torch"``, ``"triton"``, ``"cuda"``) or
    clear it with ``None`` (then ``LORA_KERNELS_BACKEND`` or ``auto`` applies)."""
    global _chosen
    if name is not None:
        _check_name(name, "set_backend")
    _chosen = name


def get_backend() -> str:
    """The backend requested for ops called without ``backend=``: set_backend, env, or auto."""
    if _chosen is not None:
        return _chosen
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env:
        _check_name(env, ENV_VAR)
        return env
    return "auto"


def _check_name(name: str, where: str) -> None:
    if not isinstance(name, str) or name not in (*BACKENDS, "auto"):
        raise ValueError(
            f"{where}: unknown backend {name!r}; expected one of 'auto', "
            + ", ".join(repr(b) for b in BACKENDS)
        )


def triton_available_reasons(device: torch.device | None = None) -> list[str]:
    """Why Triton cannot run kernels on ``device`` (empty: it can)."""
    if importlib.util.find_spec("triton") is None:
        return ["triton is not installed"]
    if device is not None and device.type == "cpu" and not interpreter_enabled():
        return ["CPU tensors need Triton's interpreter (set TRITON_INTERPRET=1 before import)"]
    if device is not None and device.type not in ("cpu", "cuda"):
        return [f"Triton kernels run on CUDA tensors, got {device.type}"]
    return []


def interpreter_enabled() -> bool:
    """True when Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def cuda_available_reasons(device: torch.device | None = None) -> list[str]:
    """Why the compiled CUDA extension cannot run on ``device`` (empty: it can)."""
    from .cuda import extension

    reason = extension.unavailable_reason()
    if reason:
        return [reason]
    if device is not None and device.type != "cuda":
        return [f"the CUDA extension needs CUDA tensors, got {device.type}"]
    return []


def available_reasons(backend: str, device: torch.device | None = None) -> list[str]:
    """Why ``backend`` cannot run at all on ``device``, whatever the inputs (empty: it can)."""
    _check_name(backend, "backend")
    if backend == "torch":
        return []
    if backend == "triton":
        return triton_available_reasons(device)
    return cuda_available_reasons(device)


def register_support(op: str, backend: str, reasons: Callable[..., list[str]]) -> None:
    """Register ``reasons(**inputs) -> list[str]``: why ``backend`` cannot serve ``op``."""
    _check_name(backend, "register_support")
    _support.setdefault(op, {})[backend] = reasons


def not_supported_reasons(op: str, backend: str, device: torch.device, **inputs) -> list[str]:
    """Every reason why ``backend`` cannot serve ``op`` on these inputs (empty: it can)."""
    reasons = available_reasons(backend, device)
    if reasons:
        return reasons
    check = _support.get(op, {}).get(backend)
    if check is None:
        return [f"{backend} has no implementation of {op}"]
    return list(check(**inputs))


def choose(op: str, requested: str | None, device: torch.device, **inputs) -> str:
    """The backend that will run ``op`` on these inputs.

    ``requested`` is the op's ``backend=`` argument (``None`` or ``"auto"`` defer to
    :func:`get_backend`). Raises ``ValueError`` when an explicit backend cannot serve.
    """
    name = get_backend() if requested in (None, "auto") else requested
    _check_name(name, f"{op}(backend=...)")
    if name != "auto":
        reasons = not_supported_reasons(op, name, device, **inputs)
        if reasons:
            raise ValueError(_explain(op, name, device, inputs))
        return name
    if device.type != "cuda":
        return "torch"
    for candidate in AUTO_ORDER:
        if candidate != "torch" and (op, candidate) not in GPU_VALIDATED:
            continue
        if not not_supported_reasons(op, candidate, device, **inputs):
            if candidate != AUTO_ORDER[0]:
                _log_fallback(op, candidate, device)
            return candidate
    raise ValueError(_explain(op, "auto", device, inputs))  # torch always serves


def _explain(op: str, requested: str, device: torch.device, inputs: dict) -> str:
    lines = [f"backend {requested!r} cannot run {op} on these inputs ({device.type} tensors):"]
    for b in BACKENDS:
        reasons = not_supported_reasons(op, b, device, **inputs)
        lines.append(f"  {b}: " + ("; ".join(reasons) if reasons else "supported"))
    return "\n".join(lines)


def _log_fallback(op: str, chosen: str, device: torch.device) -> None:
    key = (op, chosen, device.type)
    if key not in _logged_fallbacks:
        _logged_fallbacks.add(key)
        logger.debug("lora_kernels: %s on %s tensors uses backend %r", op, device.type, chosen)


def describe() -> dict[str, list[str]]:
    """Per backend, why it is unavailable on this machine (empty list: available)."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return {b: available_reasons(b, device) for b in BACKENDS}
