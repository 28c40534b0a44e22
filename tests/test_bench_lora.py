"""benchmarks/bench_lora.py runs end to end on a tiny shape and writes its JSON (what
`make demo` runs, smaller, with every provider asked for). In a subprocess: the benchmark sets
process-wide knobs (torch threads, glibc's mmap threshold) that must not leak into the other
tests. The competitors the benchmarks time compute what they stand for."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_bench_lora_tiny_run(tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "lora.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_lora.py"), "--device", "cpu",
         "--tokens", "16", "--in-features", "24", "--out-features", "20", "--rank", "4",
         "--reps", "2", "--providers", "base,peft,unsloth,torch,triton", "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {(r["mode"], r["provider"]): r for r in data["results"]}
    assert set(rows) == {(m, p) for m in ("fwd", "bwd", "full")
                         for p in ("base", "peft", "unsloth", "torch")}
    assert rows[("full", "torch")]["time_vs_peft"] > 0
    assert "triton" in data["skipped"]
    assert "time_vs_peft" in proc.stdout and "mem_vs_base" in proc.stdout


def _bench_module(name):
    import importlib

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_three_addmm_competitor_is_lora():
    """The Unsloth-style competitor computes LoRA (no dropout), forward and every gradient,
    against float64 autograd of the plain formula."""
    import torch

    bench = _bench_module("bench_lora")
    torch.manual_seed(0)
    x, w, b = torch.randn(9, 12, dtype=torch.float64), torch.randn(7, 12, dtype=torch.float64), \
        torch.randn(7, dtype=torch.float64)
    a, bb = torch.randn(3, 12, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    leaves = [t.clone().requires_grad_(i in (0, 3, 4)) for i, t in enumerate((x, w, b, a, bb))]
    y = bench.ThreeAddmmLoRA.apply(*leaves, 1.5)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref = [t.clone().requires_grad_(i in (0, 3, 4)) for i, t in enumerate((x, w, b, a, bb))]
    y_ref = ref[0] @ ref[1].t() + ref[2] + 1.5 * (ref[0] @ ref[3].t()) @ ref[4].t()
    y_ref.backward(dy)
    torch.testing.assert_close(y, y_ref)
    for got, want in zip(leaves, ref):
        if want.requires_grad:
            torch.testing.assert_close(got.grad, want.grad)


def test_prefix_attention_competitors_compute_prefix_attention():
    """The flash (no mask, bottom-right causal bias) and peft (explicit mask) competitors of
    bench_prefix_attention.py compute what the oracle does."""
    import torch

    from lora_kernels.reference.prefix_attention import oracle

    bench = _bench_module("bench_prefix_attention")
    q, k, v, pk, pv = bench.make_inputs((2, 4, 2, 9, 3, 16), "cpu", torch.float64)
    want = oracle(q, k, v, pk, pv, causal=True)
    torch.testing.assert_close(bench.sdpa_flash(q, k, v, pk, pv), want)
    torch.testing.assert_close(bench.sdpa_peft_like(q, k, v, pk, pv), want)
