"""Profile the CUDA kernels of ``csrc/`` for sm_90: each ``.cu`` compiled on its own to a cubin
(``nvcc -cubin -gencode arch=compute_90,code=sm_90 -Xptxas -v``, device code only, with the flags
and include paths torch's extension builder uses), then ``cuobjdump -sass`` / ``-elf``.

Per kernel instantiation: registers, spills, static shared memory, threads per block (from
``__launch_bounds__``), CTAs per SM allowed by registers and threads, SASS counts. Dynamic shared
memory is chosen by the host at launch and is not visible here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import triton

from . import analysis

NVCC_FLAGS = ["-O3", "-std=c++20", "--expt-relaxed-constexpr",
              "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
              "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
ARCH = ["-gencode", "arch=compute_90,code=sm_90"]


def nvcc_path() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    for cand in ([os.path.join(home, "bin", "nvcc")] if home else []) + [
            shutil.which("nvcc") or "", "/usr/local/cuda/bin/nvcc"]:
        if cand and os.path.exists(cand):
            return cand
    return None


def _cuobjdump() -> str:
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                           "cuobjdump")
    return bundled if os.path.exists(bundled) else (shutil.which("cuobjdump") or "cuobjdump")


def _torch_includes() -> list[str]:
    import torch
    inc = os.path.join(os.path.dirname(torch.__file__), "include")
    return [inc, os.path.join(inc, "torch", "csrc", "api", "include")]


def short_name(demangled: str) -> str:
    """``void ns::(anonymous namespace)::k<float, 128>(args)`` -> ``k<float, 128>``."""
    name = demangled
    if name.startswith("void "):
        name = name[5:]
    depth, cut = 0, len(name)
    for i, ch in enumerate(name):  # drop the argument list: the last top-level '('
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            cut = i
    name = name[:cut]
    head, _, tmpl = name.partition("<")
    head = head.split("::")[-1]
    return head + ("<" + tmpl if tmpl else "")


def _demangle(names: list[str]) -> dict[str, str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                             check=True).stdout.splitlines()
        return dict(zip(names, out))
    except (OSError, subprocess.CalledProcessError):
        return {n: n for n in names}


def _max_threads(elf: str) -> dict[str, int]:
    out, cur = {}, None
    for line in elf.splitlines():
        if line.startswith(".nv.info."):
            cur = line[len(".nv.info."):].strip()
        elif cur and "EIATTR_MAX_THREADS" in line:
            out[cur] = -1  # value on a following line
        elif cur and out.get(cur) == -1 and "Value:" in line:
            vals = [int(v, 16) for v in re.findall(r"0x[0-9a-f]+", line)]
            n = 1
            for v in vals:
                n *= v
            out[cur] = n
    return out


def cuda_sources(csrc: Path) -> list[Path]:
    """The device sources setup.py builds into the extension (its ``cuda_sources``: csrc/*.cpp,
    host code only, and csrc/*/*.cu); csrc/emulator/ and csrc/device/ are not among them (the
    CPU emulator's driver and headers the .cu files include)."""
    return sorted(csrc.glob("*/*.cu"))


def compile_cu(path: Path, csrc: Path, workdir: str) -> tuple[list[dict], str]:
    """Compile one .cu for sm_90 and profile its kernels; (rows, error text or '')."""
    nvcc = nvcc_path()
    cubin = os.path.join(workdir, path.stem + ".cubin")
    includes = [f"-I{csrc}"] + [f"-I{p}" for p in _torch_includes()]
    cmd = [nvcc, "-cubin", *ARCH, *NVCC_FLAGS, *includes, "-Xptxas", "-v", "-o", cubin, str(path)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return [], (r.stderr or r.stdout)[-2000:]
    ptxas = analysis.parse_ptxas_log(r.stderr + r.stdout)
    sass = analysis.sass_functions(subprocess.run([_cuobjdump(), "-sass", cubin],
                                                  capture_output=True, text=True).stdout)
    threads = _max_threads(subprocess.run([_cuobjdump(), "-elf", cubin],
                                          capture_output=True, text=True).stdout)
    names = _demangle(list(ptxas))
    rows = []
    for mangled, fn in ptxas.items():
        counts = analysis.count_sass(sass.get(mangled, ""))
        nthreads = threads.get(mangled) or None
        by_regs = None
        if nthreads:
            warps = -(-nthreads // 32)
            by_regs = analysis.occupancy(fn.regs, 0, warps).ctas_per_sm
        rows.append({
            "file": str(path.relative_to(csrc.parent)), "kernel": short_name(names[mangled]),
            "threads": nthreads, "regs": fn.regs, "spill_stores": fn.spill_stores,
            "spill_loads": fn.spill_loads, "stack": fn.stack, "static_smem": fn.static_smem,
            "ctas_per_sm_by_regs": by_regs, "sass": counts,
            "checks": {
                "no_spills": fn.spill_stores == 0 and fn.spill_loads == 0,
                "no_global_atomics": sum(counts[op] for op in analysis.ATOMIC_OPS) == 0,
            },
        })
    rows.sort(key=lambda x: x["kernel"])
    return rows, ""


def profile_csrc(csrc: Path, jobs: int = 1, log=print) -> tuple[list[dict], str]:
    """Rows for every kernel of every .cu under csrc/, and a note for the report."""
    nvcc = nvcc_path()
    if nvcc is None:
        return [], "nvcc not found: CUDA kernels not profiled."
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    version = (re.findall(r"release [\d.]+", version) or ["?"])[0]
    files = cuda_sources(csrc)
    log(f"compiling {len(files)} .cu files for sm_90 with nvcc {version} ({jobs} at a time)")
    rows, errors = [], []
    with tempfile.TemporaryDirectory() as work, ThreadPoolExecutor(jobs) as pool:
        for path, (got, err) in zip(files, pool.map(lambda p: compile_cu(p, csrc, work), files)):
            log(f"  {path.name}: {len(got)} kernels" + (f", ERROR {err[-300:]}" if err else ""))
            rows += got
            if err:
                errors.append(f"{path.name}: {err}")
    note = (f"nvcc {version}, `-cubin -gencode arch=compute_90,code=sm_90 {' '.join(NVCC_FLAGS)} "
            "-Xptxas -v`, one .cu at a time (device code only). Threads per block from "
            "`__launch_bounds__`; CTAs/SM from registers and threads only (dynamic shared memory "
            "is set by the host at launch and not visible to ptxas). Atomic counts are static "
            "instructions present in the binary, whether or not a launch takes that branch.")
    if errors:
        note += " Compile errors: " + " | ".join(errors)
    return rows, note
