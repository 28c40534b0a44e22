"""CI gate from the static sm_90 profile (``benchmarks/sm90_profile.py``): every Triton kernel in
every autotune config the autotuner may pick (for each case of ``benchmarks/sm90/cases.py``:
the benchmark shapes and their dtype, rank, dropout, padding, prefix and head-dim variants), and every CUDA kernel of ``csrc/`` (when nvcc exists), compiled
for sm_90 without a GPU, must have

- ``no_spills``:          0 bytes of register spills (ptxas),
- ``no_global_atomics``:  no ATOMG / REDG / RED / ATOM instruction in the SASS,
- ``tensor_core_dots``:   every dot with K >= 16 on tensor cores: wgmma, or mma.sync where the tile
                          has M < 64 (Triton only; rule in ``benchmarks/sm90/analysis.py``).

A failure that cannot be fixed at once is listed in ``KNOWN`` below as a strict xfail: it
xfails while exactly the listed configs fail that check, fails when the set of failing configs
changes (a regression, or a partial fix: update the entry), and XPASSes, which strict turns red,
once none fails any more (delete the entry). Everything not listed must pass. Today the list is
empty: every gated kernel x config passes under Triton 3.8 and 3.6, and every csrc/ kernel.

Compiling runs in a subprocess with ``TRITON_INTERPRET=0`` and a fresh temporary Triton cache
(nothing is reused across runs). Cost: see benchmarks/README.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "benchmarks" / "sm90_profile.py"
# the gate=True cases of benchmarks/sm90/cases.py: every case (the benchmark shapes, and the
# dtypes, ranks, dropout, padding, per-row prefixes and head dims the autotuner tunes apart)
TRITON_CASES = ("lora", "attn", "attn-decode", "attn-long", "lora-fp16", "lora-fp32", "lora-bf16A",
                "lora-r64", "lora-p0", "attn-pad", "attn-rowprefix", "attn-d64", "attn-d256")
TRITON_CHECKS = ("no_spills", "no_global_atomics", "tensor_core_dots")
CUDA_CHECKS = ("no_spills", "no_global_atomics")
ALL = "*"

# (case, kernel, check, failing configs, why). Configs: ALL (every profiled config of the
# kernel), a list, or {Triton "major.minor" or "*": list} where Triton versions differ. Triton
# kernels and configs are named as in benchmarks/results/sm90_profile.md; for "cuda" the kernel
# is the template name and the configs its template arguments (e.g. "<__half, 128>").
# Example: ("attn", "_bwd_kv_kernel", "no_spills", ["M16,N64,BLOCK_MP64,PREFIX_STAGES2,w4,s3"],
#           "why it spills").
KNOWN: list[tuple] = []


class GateViolation(AssertionError):
    """A kernel breaks a gate check (what a known failure is expected to raise)."""


def _run_profile(extra: list[str], tmp_path_factory, name: str) -> dict:
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"Triton's NVIDIA backend is not importable ({exc})")
    out = tmp_path_factory.mktemp("sm90") / f"{name}.json"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    env.pop("TRITON_CACHE_DIR", None)  # the profile makes its own fresh cache
    proc = subprocess.run([sys.executable, str(PROFILE), "--quiet", "--json", str(out), *extra],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="session")
def triton_profile(tmp_path_factory) -> dict:
    return _run_profile(["--cases", "gate", "--no-cuda"], tmp_path_factory, "triton")


@pytest.fixture(scope="session")
def cuda_profile(tmp_path_factory) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from sm90.cuda import nvcc_path
    finally:
        sys.path.pop(0)
    if nvcc_path() is None:
        pytest.skip("nvcc not found: the CUDA kernels are not compiled here")
    return _run_profile(["--no-triton"], tmp_path_factory, "cuda")


def _rows(case: str, request) -> list[dict]:
    """(kernel, config, checks or None when it did not compile) rows of one case."""
    if case == "cuda":
        rows = []
        for r in request.getfixturevalue("cuda_profile")["cuda"]:
            head, sep, tmpl = r["kernel"].partition("<")
            rows.append({"kernel": head, "config": sep + tmpl if sep else "default",
                         "checks": r["checks"], "file": r["file"]})
        return rows
    doc = request.getfixturevalue("triton_profile")
    return [{"kernel": r["kernel"], "config": r["config"], "checks": r.get("checks")}
            for r in doc["triton"] if r["case"] == case]


def _failing(rows: list[dict], check: str) -> list[dict]:
    return [r for r in rows if r["checks"] is None or not r["checks"][check]]


def _known(case: str, kernel: str, check: str):
    for k_case, k_kernel, k_check, configs, _ in KNOWN:
        if (k_case, k_kernel, k_check) == (case, kernel, check):
            return configs
    return None


@pytest.mark.parametrize("case,check", [(c, k) for c in TRITON_CASES for k in TRITON_CHECKS]
                         + [("cuda", k) for k in CUDA_CHECKS])
def test_gate(case, check, request):
    """Every kernel x config not listed in KNOWN for this check passes it (and compiles)."""
    rows = _rows(case, request)
    assert rows, f"the profile has no rows for {case}"
    unlisted = [r for r in _failing(rows, check) if _known(case, r["kernel"], check) is None]
    assert not unlisted, (
        f"{check} fails in kernels not listed in KNOWN (a regression?): "
        + "; ".join(f"{r['kernel']} {r['config']}" for r in unlisted))


def _describe(configs) -> str:
    if configs == ALL:
        return "every config"
    if isinstance(configs, dict):
        return "the configs KNOWN lists per Triton version"
    return ", ".join(configs)


@pytest.mark.parametrize("case,kernel,check,configs", [
    pytest.param(case, kernel, check, configs, id=f"{case}-{kernel}-{check}",
                 marks=pytest.mark.xfail(strict=True, raises=GateViolation,
                                         reason=f"{kernel} {check} in {_describe(configs)}: {why}"))
    for case, kernel, check, configs, why in KNOWN])
def test_known_failure(case, kernel, check, configs, request):
    """A known failure still fails in exactly the listed configs (then GateViolation: xfail)."""
    if isinstance(configs, dict):
        version = request.getfixturevalue("triton_profile")["triton_version"]
        configs = configs.get(".".join(version.split(".")[:2]), configs["*"])
    rows = [r for r in _rows(case, request) if r["kernel"] == kernel]
    assert rows, f"KNOWN lists {case} {kernel}, which the profile no longer has: delete the entry"
    failing = {f"{r['kernel']} {r['config']}" for r in _failing(rows, check)}
    listed = ({f"{r['kernel']} {r['config']}" for r in rows} if configs == ALL
              else {f"{r['kernel']} {c}" for r in rows for c in configs if r["config"] == c})
    if configs != ALL:
        missing = set(configs) - {r["config"] for r in rows}
        assert not missing, f"KNOWN lists configs the profile does not have: {sorted(missing)}"
    if failing:
        assert failing == listed, (
            f"{check} now fails in {sorted(failing)}, KNOWN lists {sorted(listed)}: update KNOWN")
        raise GateViolation(f"{check} still fails in {sorted(failing)}")


def test_profile_covers_the_gated_cases(triton_profile):
    """The profile ran every gated case, every Triton kernel compiled, and no kernel of
    lora_kernels/triton/ was left out (the profile exits non-zero when a kernel has no case)."""
    cases = {c["name"] for c in triton_profile["cases"] if c["gate"]}
    assert cases == set(TRITON_CASES)
    errors = [f"{r['kernel']} {r['config']}: {r['error']}" for r in triton_profile["triton"]
              if "error" in r]
    assert not errors, errors


# ---- the machinery the gate relies on (text parsing, occupancy, the model): fast, no compiling


@pytest.fixture
def bench_modules(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import roofline_model
    from sm90 import analysis
    return analysis, roofline_model


_TTGIR = """\
#mma = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [8, 1], instrShape = [16, 128, 16]}>
#mma1 = #ttg.nvidia_mma<{versionMajor = 2, versionMinor = 0, warpsPerCTA = [4, 1], instrShape = [16, 8]}>
    %a = tt.dot %x, %y, %z : tensor<128x16xf32, #ttg.dot_op<{opIdx = 0, parent = #blocked}>> * tensor<16x128xf32, #ttg.dot_op<{opIdx = 1, parent = #blocked}>> -> tensor<128x128xf32, #blocked> loc(#loc5)
    %b = ttng.warp_group_dot %x, %y, %z {inputPrecision = 0 : i32, isAsync = true} : !ttg.memdesc<128x64xbf16, #shared2, #smem, mutable> * !ttg.memdesc<64x128xbf16, #shared3, #smem, mutable> -> tensor<128x128xf32, #mma> loc(#loc6)
    %w = ttng.warp_group_dot_wait %b {pendings = 0 : i32} : tensor<128x128xf32, #mma> loc(#loc6)
    %c = tt.dot %x, %y, %z : tensor<32x64xbf16, #ttg.dot_op<{opIdx = 0, parent = #mma1, kWidth = 2}>> * tensor<64x32xbf16, #ttg.dot_op<{opIdx = 1, parent = #mma1, kWidth = 2}>> -> tensor<32x32xf32, #mma1> loc(#loc7)
    %d = tt.dot %x, %y, %z : tensor<64x64xbf16, #ttg.dot_op<{opIdx = 0, parent = #mma1, kWidth = 2}>> * tensor<64x32xbf16, #ttg.dot_op<{opIdx = 1, parent = #mma1, kWidth = 2}>> -> tensor<64x32xf32, #mma1> loc(#loc7)
    %e = tt.dot %x, %y, %z : tensor<64x8xf32, #ttg.dot_op<{opIdx = 0, parent = #blocked}>> * tensor<8x32xf32, #ttg.dot_op<{opIdx = 1, parent = #blocked}>> -> tensor<64x32xf32, #blocked> loc(#loc7)
#loc1 = loc("/some/where/k.py":10:5)
#loc2 = loc("/some/where/k.py":90:12)
#loc3 = loc("/some/where/k.py":44:3)
#loc4 = loc("acc"(#loc3))
#loc5 = loc(callsite(#loc2 at #loc1))
#loc6 = loc(#loc4)
#loc7 = loc("/some/where/k.py":50:1)
"""


def test_dot_rule_on_ttgir(bench_modules):
    analysis, _ = bench_modules
    dots = analysis.dots_of_ir(_TTGIR)
    got = [(d.kind, d.m, d.n, d.k, d.where, d.needs_tensor_cores and not d.on_tensor_cores)
           for d in dots]
    assert got == [
        ("fma", 128, 128, 16, "k.py:10>90", True),  # FMA dot with K = 16: fails
        ("wgmma", 128, 128, 64, "k.py:44", False),
        ("mma.sync", 32, 32, 64, "k.py:50", False),  # M < 64: wgmma impossible, mma.sync ok
        ("mma.sync", 64, 32, 64, "k.py:50", True),  # M = 64 could have been wgmma
        ("fma", 64, 32, 8, "k.py:50", False),  # K < 16: exempt
    ]


def test_ptxas_and_sass_parsing(bench_modules):
    analysis, _ = bench_modules
    log = ("ptxas info    : Compiling entry function '_k' for 'sm_90a'\n"
           "ptxas info    : Function properties for _k\n"
           "    8 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 1024 bytes smem\n")
    fn = analysis.parse_ptxas_log(log)["_k"]
    assert (fn.regs, fn.spill_stores, fn.spill_loads, fn.stack, fn.static_smem) == (
        255, 12, 16, 8, 1024)
    sass = ("        /*0090*/                   HGMMA.64x128x16.F32.BF16 gdesc[UR4], RZ, !UPT ;\n"
            "        /*00a0*/               @P0 REDG.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR4][R2.64], R5 ;\n"
            "        /*00b0*/                   ATOMS.ADD R3, [R2], R4 ;\n"
            "        /*00c0*/              @!P1 FFMA R1, R2, R3, R4 ;\n")
    counts = analysis.count_sass(sass)
    assert (counts["HGMMA"], counts["REDG"], counts["FFMA"], counts["ATOMG"], counts["total"]) == (
        1, 1, 1, 0, 4)  # ATOMS (shared memory) is not a global atomic


def test_occupancy(bench_modules):
    analysis, _ = bench_modules
    assert analysis.occupancy(254, 96 * 1024, 8).ctas_per_sm == 1
    occ = analysis.occupancy(128, 0, 4)
    assert (occ.ctas_per_sm, occ.limiter) == (4, "regs")
    occ = analysis.occupancy(32, 100 * 1024, 4)
    assert (occ.ctas_per_sm, occ.limiter) == (2, "smem")
    assert analysis.occupancy(32, 228 * 1024, 4).ctas_per_sm == 0  # over 227 KiB per CTA


def test_model_tile_counts_and_floor(bench_modules):
    _, model = bench_modules
    for lq, lk, bm, bn, off in [(100, 130, 32, 16, 30), (64, 64, 64, 64, 0), (70, 90, 16, 32, 20)]:
        brute_q = sum(1 for m in range(-(-lq // bm)) for j in range(-(-lk // bn))
                      if j * bn < min(lk, (m + 1) * bm + off))
        brute_k = sum(1 for j in range(-(-lk // bn)) for m in range(-(-lq // bm))
                      if (m + 1) * bm - 1 + off >= j * bn)
        assert model.tiles_by_query_block(lq, lk, bm, bn, off) == brute_q
        assert model.tiles_by_key_block(lq, lk, bm, bn, off) == brute_k
    s = model.LoraShape()
    floor = sum(k.seconds() for k in model.lora_cublas(s))
    assert floor == pytest.approx(2 * 2 * s.T * s.IN * s.OUT / model.PEAK["tc"])


# ---- benchmarks/gpu_check.sh's lean GPU test selection still names existing tests


def test_gpu_check_quick_selection_collects():
    """Every line of benchmarks/gpu_quick_tests.txt is a test file or node id pytest collects
    (as gpu_check.sh runs it: -m gpu -k "not compile"), so a renamed test fails here, not on
    the lent GPU machine."""
    lines = [line.split("#")[0].strip() for line in
             (ROOT / "benchmarks" / "gpu_quick_tests.txt").read_text().splitlines()]
    selection = [line for line in lines if line]
    assert selection
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                           "-p", "no:cacheprovider", "-m", "gpu", "-k", "not compile",
                           *selection], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    collected = {line.split("::")[0] + "::" + line.split("::")[1].split("[")[0]
                 for line in proc.stdout.splitlines() if "::" in line}
    for item in selection:
        file, _, test = item.partition("::")
        assert any(c.startswith(file + "::" + test.split("[")[0]) for c in collected), item
