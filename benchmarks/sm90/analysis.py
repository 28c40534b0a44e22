"""Read what a compiled sm_90 kernel does: the ptxas report, the SASS, Triton's IR.

Everything here works on text (a ptxas ``-v`` log, ``nvdisasm``/``cuobjdump -sass`` output, TTIR
and TTGIR), so it serves Triton and nvcc kernels alike. No GPU, nothing runs.

Tensor-core rule for Triton dots (``dots_of_ir``): every ``tt.dot`` of the TTIR (the source dots,
after inlining and constexpr folding) reaches the TTGIR, after the layout passes, as one of
  - ``ttng.warp_group_dot``                 -> ``wgmma``   (Hopper tensor cores, SASS HGMMA),
  - ``tt.dot`` whose result has an ``#mma`` layout (``nvidia_mma`` version 2)
                                            -> ``mma.sync`` (Ampere-style tensor cores, SASS HMMA),
  - ``tt.dot`` with any other result layout -> ``fma``     (CUDA cores, SASS FFMA).
A dot with K >= 16 passes when it is ``wgmma``, or ``mma.sync`` where its tile has M < 64 (wgmma
needs 64 rows per warp group); ``fma`` always fails. Dots are matched to source lines through
their MLIR locations (pipelining may clone a dot; every clone must pass).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

# sm_90 (H100/H200) per-SM limits, from the CUDA occupancy tables.
SM90 = {
    "sms": 132,  # H200 SXM
    "regs_per_sm": 65536,
    "max_regs_per_thread": 255,
    "reg_alloc_unit_per_warp": 256,
    "smem_per_sm": 228 * 1024,
    "smem_per_cta_max": 227 * 1024,
    "smem_reserved_per_cta": 1024,
    "smem_alloc_unit": 128,
    "max_warps_per_sm": 64,
    "max_ctas_per_sm": 32,
}

ATOMIC_OPS = ("ATOMG", "REDG", "RED", "ATOM")  # global/generic atomics and reductions (not ATOMS)
SASS_COUNTED = ("HGMMA", "HMMA", "FFMA", "LDL", "STL", "LDGSTS", "UTMALDG", "BAR", "MUFU",
                *ATOMIC_OPS)


# ----------------------------------------------------------------------------- ptxas report

@dataclass
class PtxasFunction:
    name: str
    regs: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    static_smem: int = 0


def parse_ptxas_log(log: str) -> dict[str, PtxasFunction]:
    """``ptxas -v`` output -> per entry function: registers, spills, stack, static smem."""
    out: dict[str, PtxasFunction] = {}
    cur: PtxasFunction | None = None
    for line in log.splitlines():
        m = re.search(r"(?:Compiling entry function|Function properties for) '?([\w$.]+)'?", line)
        if m:
            cur = out.setdefault(m.group(1), PtxasFunction(m.group(1)))
            continue
        if cur is None:
            continue
        if m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line):
            cur.stack, cur.spill_stores, cur.spill_loads = (int(g) for g in m.groups())
        if m := re.search(r"Used (\d+) registers", line):
            cur.regs = int(m.group(1))
            if s := re.search(r"(\d+) bytes smem", line):
                cur.static_smem = int(s.group(1))
    return out


# ----------------------------------------------------------------------------- SASS

_SASS_LINE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)")


def sass_functions(text: str) -> dict[str, str]:
    """Split ``cuobjdump -sass``/``nvdisasm`` output into {function name: its SASS text}."""
    parts: dict[str, list[str]] = {}
    cur = None
    for line in text.splitlines():
        m = (re.match(r"\s*Function\s*:\s*(\S+)", line)
             or re.match(r"\s*\.text\.([\w$.]+):", line))
        if m:
            cur = m.group(1)
            parts.setdefault(cur, [])
            continue
        if cur is not None:
            parts[cur].append(line)
    return {k: "\n".join(v) for k, v in parts.items()}


def count_sass(text: str) -> dict[str, int]:
    """Instruction counts (static, in the binary) of the opcodes that matter, plus the total."""
    counts = dict.fromkeys(SASS_COUNTED, 0)
    total = 0
    for m in _SASS_LINE.finditer(text):
        op = m.group(1)
        total += 1
        if op in counts:
            counts[op] += 1
    counts["total"] = total
    return counts


# ----------------------------------------------------------------------------- Triton IR dots

@dataclass
class Dot:
    kind: str  # "wgmma" | "mma.sync" | "fma"
    m: int
    n: int
    k: int
    dtype: str  # operand element type
    where: str  # "file.py:line" of the call in the kernel, then the lines of inlined helpers

    @property
    def needs_tensor_cores(self) -> bool:
        return self.k >= 16

    @property
    def on_tensor_cores(self) -> bool:
        return self.kind == "wgmma" or (self.kind == "mma.sync" and self.m < 64)


def _locations(ir: str) -> dict[str, list[tuple[str, int]]]:
    """MLIR location aliases -> call stack [(file, line), ...], innermost frame first."""
    raw = dict(re.findall(r"^(#loc\d*) = loc\((.*)\)\s*$", ir, flags=re.M))
    memo: dict[str, list[tuple[str, int]]] = {}

    def resolve(expr: str, depth: int = 0) -> list[tuple[str, int]]:
        if depth > 50:
            return []
        expr = expr.strip()
        if expr.startswith("#loc"):
            if expr not in memo:
                memo[expr] = []
                memo[expr] = resolve(raw.get(expr, "unknown"), depth + 1)
            return memo[expr]
        if m := re.fullmatch(r'"([^"]*)":(\d+):\d+', expr):
            return [(os.path.basename(m.group(1)), int(m.group(2)))]
        if m := re.fullmatch(r"callsite\((#loc\d*) at (#loc\d*)\)", expr):
            return resolve(m.group(1), depth + 1) + resolve(m.group(2), depth + 1)
        if m := re.fullmatch(r'"[^"]*"\((#loc\d*)\)', expr):
            return resolve(m.group(1), depth + 1)
        if m := re.fullmatch(r"fused\[(#loc\d*).*", expr):
            return resolve(m.group(1), depth + 1)
        return []

    return {alias: resolve(alias) for alias in raw}


def _where(frames: list[tuple[str, int]]) -> str:
    if not frames:
        return "?"
    outer_file, outer_line = frames[-1]
    inner = [str(line) for _, line in reversed(frames[:-1])]
    return f"{outer_file}:{outer_line}" + "".join(f">{x}" for x in inner)


_TYPE = re.compile(r"(?:tensor|!ttg\.memdesc)<(\d+)x(\d+)x(\w+)")


def dots_of_ir(ttgir: str) -> list[Dot]:
    """Every dot of a TTGIR module, classified by the rule of this module's docstring."""
    locs = _locations(ttgir)
    mma_versions = {name: int(v) for name, v in re.findall(
        r"^(#mma\d*) = #(?:ttg|triton_gpu)\.nvidia_mma<\{versionMajor = (\d+)", ttgir, flags=re.M)}
    dots = []
    for line in ttgir.splitlines():
        m = re.search(r"= (ttng\.warp_group_dot|triton_nvidia_gpu\.warp_group_dot|tt\.dot)\s", line)
        if not m:
            continue
        op = m.group(1)
        sig = line.split(" : ", 1)[1] if " : " in line else ""
        types = _TYPE.findall(sig)
        if len(types) < 2:
            continue
        (am, ak, adt), (_, bn, _) = types[0], types[1]
        result = sig.split("->", 1)[1] if "->" in sig else ""
        if op.endswith("warp_group_dot"):
            kind = "wgmma"
        else:
            enc = re.search(r",\s*(#\w+)", result)
            kind = "mma.sync" if enc and mma_versions.get(enc.group(1)) == 2 else "fma"
        loc = re.search(r"loc\((#loc\d*)\)\s*$", line)
        where = _where(locs.get(loc.group(1), [])) if loc else "?"
        dots.append(Dot(kind, int(am), int(bn), int(ak), adt, where))
    return dots


def source_dot_count(ttir: str) -> int:
    """Number of ``tt.dot`` in the TTIR: the dots of the source after inlining."""
    return len(re.findall(r"= tt\.dot\s", ttir))


# ----------------------------------------------------------------------------- occupancy

@dataclass
class Occupancy:
    ctas_per_sm: int
    limiter: str
    by: dict = field(default_factory=dict)


def occupancy(regs: int, smem: int, warps: int, limits: dict = SM90) -> Occupancy:
    """CTAs of one kernel resident on one SM from registers, shared memory and warps."""
    unit = limits["reg_alloc_unit_per_warp"]
    regs_per_warp = -(-max(regs, 1) * 32 // unit) * unit
    warps_by_regs = limits["regs_per_sm"] // regs_per_warp
    by = {
        "regs": warps_by_regs // warps,
        "warps": limits["max_warps_per_sm"] // warps,
        "ctas": limits["max_ctas_per_sm"],
    }
    if smem > limits["smem_per_cta_max"]:
        by["smem"] = 0
    elif smem > 0:
        a = limits["smem_alloc_unit"]
        per_cta = -(-(smem + limits["smem_reserved_per_cta"]) // a) * a
        by["smem"] = limits["smem_per_sm"] // per_cta
    limiter = min(by, key=lambda k: by[k])
    return Occupancy(by[limiter], limiter, by)
