"""Loader of the compiled CUDA extension (``lora_kernels._C``, built from csrc/ by setup.py).

The package imports without it: :func:`unavailable_reason` says why it cannot be used, and the
``cuda`` backend reports that reason. Reasons, in the order they are checked:

- ``"extension not built"``: no ``lora_kernels._C`` (built with LORA_KERNELS_SKIP_CUDA_BUILD=1,
  no CUDA toolkit, or a failed optional build).
- ``"built for torch X, running torch Y"``: the shared object was compiled against another torch.
- ``"import failed: ..."``: it exists but does not load (usually an ABI mismatch; rebuild).
- ``"no CUDA GPU visible"``: it loads (its ops are registered) but there is no GPU to run them.

Nothing here raises at package import; :func:`load` raises ``RuntimeError`` with the reason.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from types import ModuleType

import torch

MODULE = "lora_kernels._C"
NO_GPU = "no CUDA GPU visible"

_state: dict[str, object] = {}


def _torch_base_version(version: str) -> str:
    """The release numbers of a torch version: '2.14.1+cu130' and '2.11.0a0+git1234' ->
    '2.14.1' and '2.11.0' (what the extension records from torch's headers)."""
    match = re.match(r"\d+\.\d+\.\d+", version)
    return match.group(0) if match else version.split("+", 1)[0]


def _import() -> tuple[ModuleType | None, str | None]:
    """Import the extension once; (module, None) or (None, reason)."""
    if "result" not in _state:
        _state["result"] = _import_uncached()
    return _state["result"]  # type: ignore[return-value]


def _import_uncached() -> tuple[ModuleType | None, str | None]:
    try:
        spec = importlib.util.find_spec(MODULE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return None, "extension not built"
    try:
        module = importlib.import_module(MODULE)
    except Exception as exc:  # noqa: BLE001 - any load failure becomes a reason
        return None, f"import failed: {type(exc).__name__}: {exc}"
    built = getattr(module, "torch_version", None)
    running = _torch_base_version(torch.__version__)
    if built is not None and built != running:
        return None, f"built for torch {built}, running torch {running}"
    return module, None


def load() -> ModuleType:
    """The loaded extension (its ops are then in ``torch.ops.lora_kernels_cuda``).

    Raises ``RuntimeError`` saying why when it cannot be loaded. Does not need a GPU.
    """
    module, reason = _import()
    if module is None:
        raise RuntimeError(f"lora_kernels CUDA extension unavailable: {reason}")
    return module


def is_loaded() -> bool:
    """True when the extension is importable in this process (whether or not a GPU is visible)."""
    return _import()[0] is not None


def unavailable_reason() -> str | None:
    """Why the CUDA extension cannot be used here, or ``None`` when it can."""
    module, reason = _import()
    if module is None:
        return reason
    if not torch.cuda.is_available():
        return NO_GPU
    return None


def _reset_for_tests() -> None:
    """Forget the cached import result (tests patch the import)."""
    _state.clear()
