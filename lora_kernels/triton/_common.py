"""What every Triton launcher needs to know about where it runs."""

from __future__ import annotations

import contextlib

import torch

from ..backends import interpreter_enabled

# Triton's CPU interpreter multiplies the raw bits of bf16 operands in tl.dot (seen with
# Triton 3.8), so launchers pass this as a constexpr telling kernels to cast tiles to fp32
# before tl.dot. On a GPU it is False and bf16 dots stay on the tensor cores.
INTERPRETER: bool = interpreter_enabled()


# ----------------------------------------------------------------------------- launch hygiene

# Largest grid size on axes 1 and 2 of a CUDA launch (axis 0 allows 2**31 - 1): launchers put
# every product of block counts on axis 0.
MAX_GRID_YZ = 65535


def device_guard(t: torch.Tensor):
    """Context under which a kernel launches on ``t``'s GPU (Triton launches on the *current*
    device, which need not be the inputs' one: ``device_map`` models); a no-op off CUDA."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def pow2_bucket(n: int, cap: int | None = 1 << 16) -> int:
    """Autotune key of a length that varies from call to call (tokens, sequence lengths): its
    next power of two (at least 1), capped unless ``cap`` is None, so a new length re-tunes
    only when it crosses a bucket."""
    b = 1 << max(int(n) - 1, 0).bit_length()
    return b if cap is None else min(b, cap)


_SM_COUNTS: dict[int, int] = {}


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (split-K launchers size their grids to fill
    them); 4 off CUDA, where the interpreter runs programs one by one anyway."""
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNTS:
        _SM_COUNTS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNTS[idx]


class ConfigTable:
    """Autotune configurations by launch class: a launch may pick only among its class's
    configs (e.g. the ones that compile without spills for its dtypes and tile sizes).
    ``classify(**launch_constexprs) -> class name``. Pass ``all()`` and ``prune`` to
    ``triton.autotune(configs=..., prune_configs_by={"early_config_prune": ...})``; include
    whatever decides the class in the autotune key (tensor dtypes are in it already)."""

    def __init__(self, table: dict, classify):
        self.table, self.classify = table, classify

    def all(self) -> list:
        seen, out = set(), []
        for configs in self.table.values():
            for c in configs:
                if id(c) not in seen:
                    seen.add(id(c))
                    out.append(c)
        return out

    def of(self, **launch) -> list:
        """The configs a launch with these constexprs may pick."""
        return self.table[self.classify(**launch)]

    def prune(self, configs, named_args, **launch):
        allowed = {id(c) for c in self.of(**launch)}
        return [c for c in configs if id(c) in allowed]
