"""Static sm_90 (H100/H200) profile of every kernel of the package, compiled as it runs.

Triton: each case of ``sm90/cases.py`` calls a launcher at the benchmark shapes on meta tensors;
every kernel launch is recorded and compiled for sm_90 (fake driver, no GPU) with each autotune
config the autotuner could pick, with the runtime's specialisation. CUDA: every ``.cu`` of
``csrc/`` through ``nvcc -gencode arch=compute_90,code=sm_90 -Xptxas -v`` and ``cuobjdump -sass``.
For each kernel x config: registers, spills, shared memory, CTAs per SM, waves, tensor-core /
FFMA / atomic instruction counts and whether every dot with K >= 16 runs on tensor cores (the rule
is in ``sm90/analysis.py``). A compile profile, not a timing; a GPU run decides.

    python benchmarks/sm90_profile.py                       # everything -> benchmarks/results/
    python benchmarks/sm90_profile.py --cases gate --no-cuda --json /tmp/p.json   # what CI gates
    python benchmarks/sm90_profile.py --suffix _triton36 --no-cuda   # under another Triton

Runs Triton's compiler, not its interpreter (TRITON_INTERPRET is forced to 0) with a fresh,
temporary Triton cache, so nothing compiled earlier is reused.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"
os.environ.pop("LORA_KERNELS_AUTOTUNE", None)  # profile every config the autotuner could pick

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

_LAUNCHES: list = []  # filled before the worker processes fork


def _work(item):
    from sm90.compile import profile_launch
    index, config = item
    return profile_launch(_LAUNCHES[index], config)


def profile_triton(case_names: list[str], jobs: int, log=print) -> tuple[list[dict], list]:
    """Record the cases' launches and compile every (launch, config); rows in launch order."""
    from sm90 import capture, fake_driver
    from sm90.cases import PROFILE_CASES

    fake_driver.activate()
    kernels = capture.discover_kernels()  # also names the kernels of the launches
    cases = [c for c in PROFILE_CASES if c.name in case_names]
    launches = []
    for case in cases:
        with capture.recording(case.name) as recorded:
            case.run()
        launches += recorded
    gated = {(launch.module, launch.name) for launch in launches
             if launch.case in {c.name for c in cases if c.gate}}
    if set(case_names) >= {c.name for c in PROFILE_CASES if c.gate}:
        missing = [f"{m}.{k}" for m, ks in kernels.items() for k in ks if (m, k) not in gated]
        if missing:
            raise SystemExit(f"no gated case of benchmarks/sm90/cases.py launches {missing}: "
                             "add one")
    _LAUNCHES[:] = launches
    items = [(i, cfg) for i, launch in enumerate(launches) for cfg in launch.configs]
    log(f"compiling {len(items)} kernel x config for sm_90 ({jobs} processes)")
    rows = []
    if jobs > 1:
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(jobs) as pool:
            for row in pool.imap(_work, items):
                rows.append(row)
                log(_line(row))
    else:
        for item in items:
            rows.append(_work(item))
            log(_line(rows[-1]))
    return rows, cases


def _line(row: dict) -> str:
    if "error" in row:
        return f"  {row['case']} {row['kernel']} {row['config']}: ERROR {row['error']}"
    bad = [c for c, ok in row["checks"].items() if not ok]
    return (f"  {row['case']} {row['kernel']} {row['config']}: regs {row['regs']} spill "
            f"{row['spill_stores']} smem {row['smem']} ctas/sm {row['ctas_per_sm']} "
            f"{'FAIL ' + ','.join(bad) if bad else 'ok'} ({row['compile_s']} s)")


def toolchain() -> str:
    import subprocess

    import torch
    import triton
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    try:
        ver = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout
        ver = ver.strip().splitlines()[-1]
    except OSError:
        ver = "?"
    return f"Triton {triton.__version__} (its ptxas: {ver}), torch {torch.__version__}"


def main(argv=None) -> int:
    from sm90.cases import PROFILE_CASES
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="all",
                    help="'all', 'gate' or comma-separated case names of sm90/cases.py")
    ap.add_argument("--no-cuda", action="store_true", help="skip csrc/ (nvcc)")
    ap.add_argument("--no-triton", action="store_true")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--suffix", default="", help="file name suffix, e.g. _triton36")
    ap.add_argument("--json", default=None, help="write only this JSON file (no markdown)")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--render", metavar="JSON", default=None,
                    help="only rewrite the markdown beside this profile JSON (no compiling)")
    args = ap.parse_args(argv)
    if args.render:
        from sm90 import report
        src = Path(args.render)
        src.with_suffix(".md").write_text(report.markdown(json.loads(src.read_text())) + "\n")
        return 0
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))

    names = {"all": [c.name for c in PROFILE_CASES],
             "gate": [c.name for c in PROFILE_CASES if c.gate]}.get(
        args.cases, [n for n in args.cases.split(",") if n])
    unknown = set(names) - {c.name for c in PROFILE_CASES}
    if unknown:
        ap.error(f"unknown cases {sorted(unknown)}")

    cache = tempfile.mkdtemp(prefix="sm90-triton-cache-")
    os.environ["TRITON_CACHE_DIR"] = cache
    t0 = time.perf_counter()
    try:
        rows, cases = ([], [])
        if not args.no_triton:
            rows, cases = profile_triton(names, max(1, args.jobs), log)
        cuda_rows, cuda_note = [], ""
        if not args.no_cuda:
            from sm90 import cuda
            cuda_rows, cuda_note = cuda.profile_csrc(ROOT / "csrc", jobs=max(1, args.jobs), log=log)
    finally:
        shutil.rmtree(cache, ignore_errors=True)

    from sm90 import report
    cmd = "python benchmarks/sm90_profile.py" + (" " + " ".join(argv if argv is not None
                                                                 else sys.argv[1:])).rstrip()
    doc = {
        "title": "",
        "label": report.LABEL,
        "command": cmd.strip(),
        "toolchain": toolchain(),
        "triton_version": __import__("triton").__version__,
        "limits": __import__("sm90.analysis", fromlist=["SM90"]).SM90,
        "cases": [{"name": c.name, "gate": c.gate, "doc": c.doc} for c in cases],
        "summary": report.summarise(rows),
        "triton": rows,
        "cuda_note": cuda_note,
        "cuda": cuda_rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    doc["title"] = doc["toolchain"].split(" (")[0]
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    else:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"sm90_profile{args.suffix}.json").write_text(json.dumps(doc, indent=1) + "\n")
        (out / f"sm90_profile{args.suffix}.md").write_text(report.markdown(doc) + "\n")
    log(f"done in {doc['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
