"""SASS instructions per element of x in the LoRA shrink's main loop, per autotune config (sm_90).

The shrink (S = dropout(x) A^T plus the mask words) is the one LoRA kernel bound by issue slots
rather than bytes, so the roofline model needs its instruction count. For each profile case named
(``sm90/cases.py``), every ``_shrink`` launch is compiled for sm_90 with each config the autotuner
could pick (fake driver, no GPU), and the loop with the most instructions (the K loop) is counted
in the SASS: per element of x = loop instructions x 32 x warps / (BLOCK_M x BLOCK_K). Also split by
issue pipe (ALU: LOP3, ISETP, SEL, ...; IMAD / FP32: IMAD, FADD, ...), each of which takes a warp
instruction every 2 cycles on sm_90.

    python benchmarks/lora_shrink_loop.py                       # lora, lora-bf16A
    python benchmarks/lora_shrink_loop.py --cases lora-p0,lora-fp16 --ops

Budget at T=8192, in=4096 on an H200: 1 instruction per element of x is 2^25 / 32 warp
instructions over 132 SMs x 4 schedulers x 1.98 GHz = 1.0 us (the shrink's bytes: 15.9 us).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"
os.environ.pop("LORA_KERNELS_AUTOTUNE", None)
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="shrink-loop-"))
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

ALU = {"LOP3", "ISETP", "SEL", "SHF", "LEA", "PRMT", "PLOP3", "IADD3", "MOV", "SGXT", "IMNMX",
       "VIMNMX", "BMSK", "F2FP", "FSEL", "FSETP", "FMNMX", "LOP", "P2R", "R2P"}
FMA = {"IMAD", "IDP", "FADD", "FMUL", "FFMA"}


def _instructions(sass: str) -> tuple[list[str], dict[str, int]]:
    """SASS lines -> (instructions in order, label -> index of the next instruction)."""
    instrs, labels = [], {}
    for line in sass.splitlines():
        m = re.match(r"\s*\.(L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(instrs)
            continue
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?);", line)
        if m:
            instrs.append(m.group(1).strip())
    return instrs, labels


def main_loop(sass: str) -> list[str]:
    """The body (instructions, NOPs dropped) of the longest backward branch's loop."""
    instrs, labels = _instructions(sass)
    best: list[str] = []
    for i, ins in enumerate(instrs):
        m = re.search(r"\bBRA\b.*?\.(L_x_\d+)", ins)
        if m and labels.get(m.group(1), i + 1) <= i:
            body = [b for b in instrs[labels[m.group(1)]:i + 1] if not b.startswith("NOP")]
            best = max(best, body, key=len)
    return best


def opcode(instruction: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", instruction).split()[0].split(".")[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="lora,lora-bf16A")
    ap.add_argument("--ops", action="store_true", help="also print the loop's opcode counts")
    args = ap.parse_args()

    import triton
    from sm90 import analysis, capture, fake_driver
    from sm90.cases import PROFILE_CASES
    from sm90.compile import _compile, _sass, config_id

    fake_driver.activate()
    capture.discover_kernels()
    print(f"triton {triton.__version__}")
    for name in args.cases.split(","):
        case = next(c for c in PROFILE_CASES if c.name == name)
        with capture.recording(case.name) as recorded:
            case.run()
        for launch in (l for l in recorded if l.name == "_shrink"):
            print(f"{name}: {launch.label}")
            for cfg in launch.configs:
                kernel, log = _compile(launch, cfg)
                sass = _sass(kernel.asm["cubin"])
                ptxas = next(iter(analysis.parse_ptxas_log(log).values()))
                body = main_loop(sass)
                ops = collections.Counter(opcode(b) for b in body)
                per = 32 * cfg.num_warps / (cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_K"])
                alu = sum(v for k, v in ops.items() if k in ALU)
                fma = sum(v for k, v in ops.items() if k in FMA)
                print(f"  {config_id(cfg):<22} regs {ptxas.regs:3d} spills "
                      f"{ptxas.spill_stores}/{ptxas.spill_loads} HGMMA "
                      f"{len(re.findall(r'HGMMA', sass)):2d} loop {len(body):4d} -> "
                      f"{len(body) * per:5.2f} per element (ALU {alu * per:.2f}, "
                      f"IMAD/FP32 {fma * per:.2f})")
                if args.ops:
                    print("   ", dict(ops.most_common()))


if __name__ == "__main__":
    main()
