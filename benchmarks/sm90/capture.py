"""Record the Triton launches a launcher makes, with the arguments it computes, without running.

The profile does not hand-type kernel arguments (hand-typed signatures drift from what runs): a
case (``cases.py``) calls the package's own launcher on ``meta`` tensors of the benchmark shapes,
and while ``recording()`` is active every ``kernel[grid](...)`` call is intercepted and stored as
a ``Launch``: the kernel, every argument as the launcher passed it (integers with their real
values, so Triton specialises ``== 1`` and ``% 16`` as at runtime), the constexprs, the grid and
the autotune configs the autotuner could pick for that call (after its pruning). Nothing is
compiled or launched here; ``compile.py`` compiles each (launch, config).
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
import re
from dataclasses import dataclass, field

import torch
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction


@dataclass
class Launch:
    case: str
    kernel: object  # the Autotuner or JITFunction the launcher subscripted
    args: tuple
    kwargs: dict
    grid: object
    configs: list = field(default_factory=list)  # triton.Config, or [None] for a plain kernel
    label: str = ""  # kernel name, plus the constexprs that tell two launches of it apart

    @property
    def jit_fn(self) -> JITFunction:
        fn = self.kernel
        while not isinstance(fn, JITFunction):
            fn = fn.fn
        return fn

    @property
    def name(self) -> str:
        return self.jit_fn.fn.__name__

    @property
    def module(self) -> str:
        return self.jit_fn.fn.__module__

    def named_args(self) -> dict:
        return dict(zip(self.jit_fn.arg_names, self.args)) | self.kwargs

    def grid_size(self, config) -> int:
        grid = self.grid
        if callable(grid):
            meta = self.named_args() | (config.all_kwargs() if config is not None else {})
            grid = grid(meta)
        n = 1
        for g in grid:
            n *= int(g)
        return n


_ACTIVE: list[Launch] | None = None
_CASE = ""


def _autotuner_run(self, *args, grid, warmup, **kwargs):
    self.nargs = dict(zip(self.arg_names, args))
    try:
        configs = list(self.prune_configs(kwargs))
    finally:
        self.nargs = None
    _ACTIVE.append(Launch(_CASE, self, args, kwargs, grid, configs))


def _jit_run(self, *args, grid, warmup, **kwargs):
    _ACTIVE.append(Launch(_CASE, self, args, kwargs, grid, [None]))


@contextlib.contextmanager
def recording(case: str):
    """Intercept every Triton kernel launch made inside; yields the list of ``Launch``."""
    global _ACTIVE, _CASE
    if _ACTIVE is not None:
        raise RuntimeError("recording() does not nest")
    saved = Autotuner.run, JITFunction.run
    _ACTIVE, _CASE = [], case
    Autotuner.run, JITFunction.run = _autotuner_run, _jit_run
    try:
        yield _ACTIVE
    finally:
        Autotuner.run, JITFunction.run = saved
        _label(_ACTIVE)
        _ACTIVE, _CASE = None, ""


def _label(launches: list[Launch]) -> None:
    """Name each launch by its kernel; where one kernel is launched twice, add the constexprs
    whose values differ between its launches (e.g. ``_bwd_kv_kernel[IS_PREFIX=True]``)."""
    by_name: dict[str, list[Launch]] = {}
    for launch in launches:
        by_name.setdefault(launch.name, []).append(launch)
    for name, group in by_name.items():
        for launch in group:
            launch.label = name
        if len(group) < 2:
            continue
        keys = sorted({k for launch in group for k in launch.kwargs
                       if len({repr(x.kwargs.get(k)) for x in group}) > 1})
        for launch in group:
            launch.label = name + "[" + ",".join(f"{k}={launch.kwargs.get(k)}" for k in keys) + "]"


def meta(*shape, dtype=torch.bfloat16) -> torch.Tensor:
    """A tensor with a shape and a dtype but no storage: launchers allocate and reshape freely."""
    return torch.empty(*shape, dtype=dtype, device="meta")


def discover_kernels(package: str = "lora_kernels.triton") -> dict[str, list[str]]:
    """Every kernel of every module of ``package``: autotuned kernels, and plain ``@triton.jit``
    functions that the module launches (``name[grid](...)``); helpers called from kernels are
    left out. Returns {module: [kernel names]}."""
    pkg = importlib.import_module(package)
    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{package}.{info.name}")
        source = open(mod.__file__).read()
        names = []
        for attr, obj in vars(mod).items():
            if isinstance(obj, Autotuner) or (
                    isinstance(obj, JITFunction) and re.search(rf"\b{re.escape(attr)}\[", source)):
                names.append(attr)
        if names:
            found[mod.__name__] = sorted(names)
    return found
