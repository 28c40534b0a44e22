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
from triton.tools.tensor_descriptor import TensorDescriptor


@dataclass
class Launch:
    case: str
    kernel: object  # the Autotuner or JITFunction the launcher subscripted
    args: tuple
    kwargs: dict
    grid: object
    configs: list = field(default_factory=list)  # triton.Config, or [None] for a plain kernel
    label: str = ""  # kernel name, plus the constexprs that tell two launches of it apart
    tag: str = ""  # set by capture.tag() around the launcher call

    @property
    def jit_fn(self) -> JITFunction:
        fn = self.kernel
        while not isinstance(fn, JITFunction):
            fn = fn.fn
        return fn

    @property
    def name(self) -> str:
        """The kernel's name in its module (``fwd_gemm`` and ``dx_gemm`` are two autotuners of
        one ``lora_gemm``: each keeps its own name)."""
        return _NAMES.get(id(self.kernel), self.jit_fn.fn.__name__)

    @property
    def module(self) -> str:
        return self.jit_fn.fn.__module__

    def signature(self) -> tuple:
        """What decides the compiled code: the kernel, tensor dtypes, descriptors, scalars,
        constexprs and configs (not the grid)."""
        def norm(v):
            if isinstance(v, torch.Tensor):
                return ("tensor", v.dtype)
            if isinstance(v, TensorDescriptor):
                return ("desc", v.base.dtype, tuple(v.shape), tuple(v.strides))
            return repr(v)
        return (id(self.kernel), tuple(norm(a) for a in self.args),
                tuple(sorted((k, norm(v)) for k, v in self.kwargs.items())),
                tuple(repr(c) for c in self.configs))

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
_TAG = ""


def _record(launch: Launch) -> None:
    """Keep a launch unless the same kernel was already launched with the same specialisation
    (a second backward re-launching an identical ``_ds_db``: one compile is enough)."""
    launch.tag = _TAG
    key = launch.signature()
    if all(x.signature() != key for x in _ACTIVE):
        _ACTIVE.append(launch)


def _autotuner_run(self, *args, grid, warmup, **kwargs):
    self.nargs = dict(zip(self.arg_names, args))
    try:
        configs = list(self.prune_configs(kwargs))
    finally:
        self.nargs = None
    _record(Launch(_CASE, self, args, kwargs, grid, configs))


def _jit_run(self, *args, grid, warmup, **kwargs):
    _record(Launch(_CASE, self, args, kwargs, grid, [None]))


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


@contextlib.contextmanager
def tag(text: str):
    """Launches made inside carry ``text``: it names them where one kernel is launched more
    than once with the same constexprs (e.g. ``_merge_kernel[Lq=16]``)."""
    global _TAG
    saved, _TAG = _TAG, text
    try:
        yield
    finally:
        _TAG = saved


def _label(launches: list[Launch]) -> None:
    """Name each launch by its kernel; where one kernel is launched twice, add the constexprs
    whose values differ between its launches (e.g. ``_bwd_kv_kernel[STORE_DS=False]``), else
    the launches' tags."""
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
            parts = [f"{k}={launch.kwargs.get(k)}" for k in keys]
            if not parts or len({x.tag for x in group}) == len(group):
                parts = [launch.tag] if launch.tag else parts
            launch.label = name + "[" + ",".join(parts) + "]"


def meta(*shape, dtype=torch.bfloat16) -> torch.Tensor:
    """A tensor with a shape and a dtype but no storage: launchers allocate and reshape freely."""
    return torch.empty(*shape, dtype=dtype, device="meta")


def discover_kernels(package: str = "lora_kernels.triton") -> dict[str, list[str]]:
    """Every kernel of every module of ``package``, in the module that defines it: each
    autotuner, and each ``@triton.jit`` function that is neither wrapped by an autotuner nor
    called from another jit function's body (a helper). Returns {module: [kernel names]} and
    remembers each kernel's name (``Launch.name``)."""
    pkg = importlib.import_module(package)
    jits, tuned, bodies, found = {}, set(), [], {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{package}.{info.name}")
        for attr, obj in vars(mod).items():
            if not isinstance(obj, (Autotuner, JITFunction)):
                continue
            fn = obj
            while not isinstance(fn, JITFunction):
                fn = fn.fn
            if fn.fn.__module__ != mod.__name__:
                continue  # imported from the module that defines it
            bodies.append(fn.src)
            if isinstance(obj, Autotuner):
                tuned.add(id(fn))
                found.setdefault(mod.__name__, []).append(attr)
                _NAMES[id(obj)] = attr
            else:
                jits[(mod.__name__, attr)] = obj
    for (module, attr), fn in jits.items():
        called = any(re.search(rf"\b{re.escape(attr)}\s*\(", body) for body in bodies
                     if body is not fn.src)
        if id(fn) not in tuned and not called:
            found.setdefault(module, []).append(attr)
            _NAMES[id(fn)] = attr
    return {m: sorted(names) for m, names in sorted(found.items())}


_NAMES: dict[int, str] = {}  # id(kernel object) -> its name, filled by discover_kernels
