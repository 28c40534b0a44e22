"""Compile one recorded Triton launch for sm_90 with one autotune config, and profile it.

``profile_launch`` returns a flat dict (one row of the profile table). The ptxas report is the
one Triton's own ptxas call writes (``TRITON_DUMP_PTXAS_LOG``), so registers and spills are those
of the binary Triton would load; SASS comes from Triton's bundled ``nvdisasm``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import subprocess
import tempfile
import time

import torch
import triton
from triton.runtime.jit import MockTensor
from triton.tools.tensor_descriptor import TensorDescriptor

from . import analysis


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _mock(value):
    """Tensors -> MockTensor of the same dtype (data_ptr 0: aligned, as fresh allocations are);
    a TMA descriptor -> a copy over a MockTensor base (the config's pre-hook sets its block)."""
    if isinstance(value, torch.Tensor):
        return MockTensor(value.dtype)
    if isinstance(value, TensorDescriptor):
        return dataclasses.replace(value, base=MockTensor(value.base.dtype),
                                   block_shape=list(value.block_shape))
    return value


def config_id(config) -> str:
    """``M128,N128,K64,G8,w8,s3`` for BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, 8 warps,
    3 stages; ``default`` for a kernel launched without a config."""
    if config is None:
        return "default"
    short = {"BLOCK_M": "M", "BLOCK_N": "N", "BLOCK_K": "K", "GROUP_M": "G"}
    parts = [f"{short.get(k, k)}{v}" for k, v in config.kwargs.items()]
    parts += [f"w{config.num_warps}", f"s{config.num_stages}"]
    if getattr(config, "maxnreg", None):
        parts.append(f"r{config.maxnreg}")
    return ",".join(parts)


def _compile(launch, config):
    """Compile (no launch) with the runtime's specialisation; returns (kernel, ptxas log)."""
    args = tuple(_mock(a) for a in launch.args)
    kwargs = {k: _mock(v) for k, v in launch.kwargs.items()}
    if config is not None:
        kwargs.update(config.all_kwargs())
        if config.pre_hook is not None:  # as the autotuner does before a launch (TMA blocks)
            config.pre_hook(dict(zip(launch.jit_fn.arg_names, args)) | kwargs)
    buf = io.StringIO()
    old = os.environ.get("TRITON_DUMP_PTXAS_LOG")
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    try:
        with contextlib.redirect_stdout(buf):
            kernel = launch.jit_fn.warmup(*args, grid=(1,), **kwargs)
    finally:
        if old is None:
            os.environ.pop("TRITON_DUMP_PTXAS_LOG", None)
        else:
            os.environ["TRITON_DUMP_PTXAS_LOG"] = old
    log = buf.getvalue()
    if "registers" not in log:  # a Triton without the knob: run ptxas -v on the PTX ourselves
        log = _ptxas_again(kernel.asm["ptx"])
    return kernel, log


def _ptxas_again(ptx: str) -> str:
    import re
    arch = re.search(r"\.target\s+(\S+)", ptx).group(1)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([_tool("ptxas"), "-lineinfo", "-v", f"--gpu-name={arch}", src, "-o",
                            os.path.join(d, "k.cubin")], capture_output=True, text=True)
        return r.stderr


def _sass(cubin: bytes) -> str:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([_tool("nvdisasm"), "-c", path], capture_output=True, text=True,
                              check=True).stdout


def profile_launch(launch, config) -> dict:
    """One table row: resources, instruction counts, dots and gate checks of (launch, config)."""
    t0 = time.perf_counter()
    row = {"case": launch.case, "kernel": launch.label, "module": launch.module,
           "config": config_id(config)}
    try:
        kernel, log = _compile(launch, config)
    except Exception as exc:  # noqa: BLE001 - a kernel that does not compile is a result
        row.update(error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}",
                   compile_s=round(time.perf_counter() - t0, 1))
        return row
    md = kernel.metadata
    ptxas = next(iter(analysis.parse_ptxas_log(log).values()), analysis.PtxasFunction("?"))
    sass = analysis.count_sass(_sass(kernel.asm["cubin"]))
    dots = analysis.dots_of_ir(kernel.asm["ttgir"])
    smem = int(md.shared) + ptxas.static_smem
    occ = analysis.occupancy(ptxas.regs, smem, md.num_warps)
    ctas = launch.grid_size(config)
    slots = occ.ctas_per_sm * analysis.SM90["sms"]
    failing = [d for d in dots if d.needs_tensor_cores and not d.on_tensor_cores]
    # the SASS must agree with the IR: a wgmma dot emits HGMMA, an mma.sync dot HMMA
    sass_agrees = ((sass["HGMMA"] > 0) == any(d.kind == "wgmma" for d in dots)
                   and (sass["HMMA"] > 0) == any(d.kind == "mma.sync" for d in dots))
    row.update(
        warps=md.num_warps, stages=md.num_stages, regs=ptxas.regs,
        spill_stores=ptxas.spill_stores, spill_loads=ptxas.spill_loads, stack=ptxas.stack,
        smem=smem, ctas_per_sm=occ.ctas_per_sm, occupancy_limit=occ.limiter,
        grid=ctas, waves=round(ctas / slots, 2) if slots else None,
        sass={k: v for k, v in sass.items()},
        source_dots=analysis.source_dot_count(kernel.asm["ttir"]),
        dots=[{"where": d.where, "m": d.m, "n": d.n, "k": d.k, "dtype": d.dtype, "kind": d.kind}
              for d in dots],
        checks={
            "no_spills": ptxas.spill_stores == 0 and ptxas.spill_loads == 0,
            "no_global_atomics": sum(sass[op] for op in analysis.ATOMIC_OPS) == 0,
            "tensor_core_dots": not failing and sass_agrees,
        },
        failing_dots=sorted({f"{d.where} {d.m}x{d.n}x{d.k} {d.dtype} {d.kind}" for d in failing}
                            | (set() if sass_agrees else {"SASS disagrees with the TTGIR dots"})),
        compile_s=round(time.perf_counter() - t0, 1),
    )
    return row
