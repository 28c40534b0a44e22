"""benchmarks/bench_lora.py runs end to end on a tiny shape and writes its JSON (what
`make demo` runs, smaller). In a subprocess: the benchmark sets process-wide knobs (torch
threads, glibc's mmap threshold) that must not leak into the other tests."""

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
         "--reps", "2", "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {(r["mode"], r["provider"]): r for r in data["results"]}
    assert set(rows) == {(m, p) for m in ("fwd", "bwd", "full") for p in ("base", "peft", "torch")}
    assert rows[("full", "torch")]["time_vs_peft"] > 0
    assert "triton" in data["skipped"]
    assert "time_vs_peft" in proc.stdout and "mem_vs_base" in proc.stdout
