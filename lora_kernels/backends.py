"""Which backends exist, what each supports, and how one is chosen: the one dispatch of the
package, shared by every op.

Three backends serve every operator:

- ``cuda``:   the compiled extension built from ``csrc/`` (CUDA tensors only).
- ``triton``: the Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).
- ``torch``:  plain PyTorch, the fallback everywhere (cuBLAS and SDPA's fused kernels on CUDA).

Choice, first match wins: the ``backend=`` argument of an op, :func:`set_backend`, the
``LORA_KERNELS_BACKEND`` environment variable, else ``"auto"``. ``auto`` takes, on CUDA
tensors, the first of :data:`AUTO_ORDER` that supports the inputs *and* has passed the GPU
check (:data:`GPU_VALIDATED`); on CPU tensors, ``torch``. An explicit request that cannot serve
the inputs raises a ``ValueError`` listing every backend's reasons; an automatic fallback is
silent except for one debug log line.

An op declares, with :func:`register_op`, the module of each backend (imported on first use by
:func:`load`). A backend module holds the backend contract (``forward``, ``backward``,
``not_supported_reasons(**inputs) -> list[str]``) and its capabilities as data,
``CAPABILITIES = Capabilities(...)`` (devices, dtypes, head dims, rank, dropout, after the
``SUPPORTED_*`` attributes of xformers' operators); its ``not_supported_reasons`` explains them
with :meth:`Capabilities.reasons` and adds what is not data (grid limits, compute capability).

Under ``torch.compile`` an op calls :func:`choose_static` with static stand-ins of its inputs:
the choice is made once at trace time and is a constant of the graph.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType

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
_modules: dict[str, dict[str, str]] = {}
_loaded: dict[str, ModuleType] = {}
_logged_fallbacks: set[tuple[str, str, str]] = set()


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (for reasons and messages)."""
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class Capabilities:
    """What one backend of one op serves, as data; ``None`` means any.

    devices: tensor device types; dtypes: compute dtypes; head_dims / max_head_dim: attention
    head dims; max_rank: LoRA rank; dropout: whether dropout in training is served.
    """

    devices: tuple[str, ...] | None = None
    dtypes: tuple[torch.dtype, ...] | None = None
    head_dims: tuple[int, ...] | None = None
    max_head_dim: int | None = None
    max_rank: int | None = None
    dropout: bool = True

    def reasons(self, tensors: Mapping[str, torch.Tensor], *, head_dim: int | None = None,
                rank: int | None = None, dropout: bool = False) -> list[str]:
        """Why these inputs fall outside the capabilities (empty: they do not). ``tensors``:
        the named tensors whose device and dtype count; ``dropout``: dropout in training."""
        out = []
        for name, t in tensors.items():
            if self.devices is not None and t.device.type not in self.devices:
                out.append(f"{name} is on {t.device.type}; this backend needs "
                           f"{' or '.join(self.devices)} tensors")
            if self.dtypes is not None and t.dtype not in self.dtypes:
                allowed = ", ".join(dtype_name(d) for d in self.dtypes)
                out.append(f"{name} dtype {dtype_name(t.dtype)} is not supported ({allowed})")
        if head_dim is not None and self.head_dims is not None and head_dim not in self.head_dims:
            out.append(f"head dim {head_dim} is not supported "
                       f"({', '.join(map(str, self.head_dims))})")
        if head_dim is not None and self.max_head_dim is not None and head_dim > self.max_head_dim:
            out.append(f"head dim {head_dim} is not supported (up to {self.max_head_dim})")
        if rank is not None and self.max_rank is not None and rank > self.max_rank:
            out.append(f"rank {rank} > {self.max_rank} is not supported")
        if dropout and not self.dropout:
            out.append("dropout in training is not supported by this backend (torch serves it)")
        return out


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


# ----------------------------------------------------------------------------- registry


def register_op(op: str, modules: Mapping[str, str]) -> None:
    """Declare the module implementing ``op`` for each backend (``{"torch": "pkg.mod", ...}``);
    each is imported on first use and asked ``not_supported_reasons(**inputs)``."""
    for backend, path in modules.items():
        _check_name(backend, "register_op")
        _modules.setdefault(op, {})[backend] = path
        register_support(op, backend, _module_reasons(op, backend))


def _module_reasons(op: str, backend: str) -> Callable[..., list[str]]:
    def reasons(**inputs) -> list[str]:
        try:
            module = load(op, backend)
        except ImportError as exc:  # e.g. triton missing, or the cuda wrappers not in this build
            return [f"{_modules[op][backend]} cannot be imported ({exc})"]
        return list(module.not_supported_reasons(**inputs))

    return reasons


def register_support(op: str, backend: str, reasons: Callable[..., list[str]]) -> None:
    """Register ``reasons(**inputs) -> list[str]``: why ``backend`` cannot serve ``op``."""
    _check_name(backend, "register_support")
    _support.setdefault(op, {})[backend] = reasons


def load(op: str, backend: str) -> ModuleType:
    """The module of ``backend`` for ``op``, imported on first use. Every backend module is
    imported by the first eager choice that asks it, so the custom ops, which run eagerly
    even under ``torch.compile``, only look it up."""
    path = _modules[op][backend]
    module = _loaded.get(path)
    if module is None:
        module = _loaded[path] = importlib.import_module(path)
    return module


def capabilities(op: str, backend: str) -> Capabilities | None:
    """The declared :class:`Capabilities` of ``backend`` for ``op`` (None if it declares none
    or cannot be imported)."""
    try:
        return getattr(load(op, backend), "CAPABILITIES", None)
    except ImportError:
        return None


# ----------------------------------------------------------------------------- choice


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


def spec(shape: tuple[int, ...], dtype: torch.dtype) -> tuple:
    """A static description of a tensor for :func:`choose_static`: its shape, with every size
    that may vary between calls (batch, sequence, tokens) given as 1, and its dtype."""
    return ("tensor", tuple(int(s) for s in shape), dtype)


@torch.compiler.assume_constant_result
def choose_static(op: str, requested: str | None, device: torch.device,
                  inputs: tuple[tuple[str, object], ...]) -> str:
    """:func:`choose` for ``torch.compile``: ``inputs`` is a tuple of ``(name, value)`` with
    each tensor given as :func:`spec`. Run once at trace time on stand-ins (one element each,
    expanded to the shape: no memory); the result is a constant of the graph."""

    def stand_in(value):
        if isinstance(value, tuple) and len(value) == 3 and value[0] == "tensor":
            _, shape, dtype = value
            return torch.empty((1,) * len(shape), dtype=dtype, device=device).expand(*shape)
        return value

    return choose(op, requested, device, **{name: stand_in(v) for name, v in inputs})


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
