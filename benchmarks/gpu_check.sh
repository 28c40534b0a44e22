#!/usr/bin/env bash
# The GPU check: one command for a lent GPU machine (no internet needed).
#
#   OUT=/some/dir benchmarks/gpu_check.sh
#
# 1. builds the package and its CUDA extension with all cores (pip install -v --no-index
#    --no-build-isolation --no-deps -e ., LORA_KERNELS_FORCE_CUDA_BUILD=1,
#    TORCH_CUDA_ARCH_LIST=9.0 unless set),
# 2. runs the GPU tests against the float64 reference on CUDA tensors: by default a lean
#    selection (benchmarks/gpu_quick_tests.txt: every kernel once at a realistic size, every
#    backend's correctness, no torch.compile tests); GPU_CHECK_TESTS=all runs the whole GPU suite
#    (pytest -m gpu: 408 tests, several times the Triton compiles; its default budget is then
#    1200 s, beyond the 8 minutes),
# 3. runs both microbenchmarks at their GPU shapes (JSON under $OUT),
# 4. prints one compact table last (also $OUT/gpu_check_table.md).
#
# Every step runs even when an earlier one failed; the exit status is non-zero if any failed.
# Budget: under 8 minutes in all: each step has its own timeout, cut to what is left of
# GPU_CHECK_BUDGET_S (default 460 s); a step with no time left is skipped and counts as failed.
# Expected on an H200 with 16 cores (an estimate: no run yet): install with the CUDA build
# (sm_90 only, 4 sources in parallel) about 1 min, the lean GPU tests 3-4.5 min (the
# slowest 15 are listed in pytest_gpu.log), each benchmark under 1.5 min.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT="${OUT:-$ROOT/out/gpu_check}"
mkdir -p "$OUT"
# The GPU machine's image: a plain `python3` is the interpreter that holds torch (there may be
# no `python`). PYTHON overrides.
PY="${PYTHON:-$(command -v python3 || command -v python)}"
if ! "$PY" -c "import torch, triton" >/dev/null 2>&1; then
  echo "gpu_check: $PY cannot import torch and triton; set PYTHON to the interpreter that can" >&2
  exit 2
fi

export TRITON_INTERPRET=0                 # real Triton on the GPU (conftest agrees via /dev/nvidia0)
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export LORA_KERNELS_FORCE_CUDA_BUILD=1
export LORA_KERNELS_PTXAS_VERBOSE=1       # registers/spills per kernel, in the install log

# Benchmarks: each writes $OUT/<name>.json, shown side by side per provider in the table.
# To add one: a BENCH_<NAME> command line, a step below, and its name in BENCHES.
BENCH_LORA=("$PY" benchmarks/bench_lora.py --device cuda --json "$OUT/bench_lora.json")
BENCH_ATTN=("$PY" benchmarks/bench_prefix_attention.py --device cuda --out "$OUT/bench_prefix_attention.json")
BENCHES=(bench_lora bench_prefix_attention)

# GPU tests: the lean selection (one pytest node id or file per line, '#' comments) or all.
TESTS_MODE="${GPU_CHECK_TESTS:-quick}"
if [ "$TESTS_MODE" = all ]; then
  PYTEST_SELECTION=(-m gpu)
  PYTEST_LIMIT=900
else
  mapfile -t QUICK < <(sed -e 's/#.*//' -e 's/[[:space:]]*$//' -e '/^$/d' benchmarks/gpu_quick_tests.txt)
  PYTEST_SELECTION=(-m gpu -k "not compile" "${QUICK[@]}")
  PYTEST_LIMIT=300
fi

STEPS=()
FAILED=0
DEFAULT_BUDGET_S=460
[ "$TESTS_MODE" = all ] && DEFAULT_BUDGET_S=1200
BUDGET_S="${GPU_CHECK_BUDGET_S:-$DEFAULT_BUDGET_S}"  # all steps; the table takes a few seconds more

step() {  # step NAME TIMEOUT_S CMD...: run, log to $OUT/NAME.log, record status and seconds
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET_S - SECONDS))
  if [ "$left" -lt 15 ]; then
    echo "=== [$name] skipped: the ${BUDGET_S}s budget is spent"
    STEPS+=("$name|SKIPPED (budget)|0")
    FAILED=1
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== [$name] $*"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local secs=$((SECONDS - start))
  tail -n 25 "$OUT/$name.log"
  local status=ok
  if [ "$rc" -ne 0 ]; then
    status="FAIL (rc $rc)"
    [ "$rc" -eq 124 ] && status="TIMEOUT (${limit}s)"
    FAILED=1
  fi
  STEPS+=("$name|$status|$secs")
}

# Offline: --no-index (nothing to fetch; the build uses the installed torch and setuptools).
# -v: pip hides the build's output otherwise, and the ptxas register/spill lines with it.
step install 240 "$PY" -m pip install -v --no-index --no-build-isolation --no-deps -e .
step info 60 "$PY" -m lora_kernels.cli info
# The cuda tests skip when the extension does not load: make that a failure here.
step extension 60 "$PY" -c "from lora_kernels.cuda import extension; r = extension.unavailable_reason(); print('CUDA extension:', r or 'ready'); raise SystemExit(r is not None)"
step pytest_gpu "$PYTEST_LIMIT" "$PY" -m pytest "${PYTEST_SELECTION[@]}" -q -p no:cacheprovider \
  --durations=15 --junitxml="$OUT/pytest_gpu.xml" -o junit_family=xunit2
step bench_lora 90 "${BENCH_LORA[@]}"
step bench_prefix_attention 90 "${BENCH_ATTN[@]}"

# The table: steps, then GPU test counts per test file, then one table per benchmark with
# every provider side by side (median ms, and the ratio to peft run beside it).
"$PY" - "$OUT" "${BENCHES[*]}" "${STEPS[@]}" <<'PYEOF' | tee "$OUT/gpu_check_table.md"
import json, os, sys, xml.etree.ElementTree as ET
from collections import defaultdict

sys.path.insert(0, "benchmarks")
from common import provider_table

out, benches, steps = sys.argv[1], sys.argv[2].split(), sys.argv[3:]
print("\n## GPU check\n")
try:
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU {gpu}\n")
except Exception as exc:  # noqa: BLE001
    print(f"torch unavailable: {exc}\n")
print("| step | status | seconds |\n| --- | --- | --- |")
for s in steps:
    name, status, secs = s.split("|")
    print(f"| {name} | {status} | {secs} |")

junit = os.path.join(out, "pytest_gpu.xml")
if os.path.exists(junit):
    counts = defaultdict(lambda: defaultdict(int))
    for case in ET.parse(junit).getroot().iter("testcase"):
        file = case.get("classname", "?").split(".")[-1]
        kind = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                kind = "failed"
            elif child.tag == "skipped":
                kind = "skipped"
        counts[file][kind] += 1
    print("\n| GPU tests | passed | failed | skipped |\n| --- | --- | --- | --- |")
    for file, c in sorted(counts.items()):
        print(f"| {file} | {c['passed']} | {c['failed']} | {c['skipped']} |")

for bench in benches:
    path = os.path.join(out, bench + ".json")
    if not os.path.exists(path):
        print(f"\n{bench}: no JSON written")
        continue
    data = json.load(open(path))
    rows = data.get("rows") or data.get("results") or []
    cfg = data.get("config", {})
    if cfg:  # bench_lora: one shape, given in its config
        shape = "T{tokens} in{in_features} out{out_features} r{rank} {dtype}".format(**cfg)
        rows = [{"shape": shape, **r} for r in rows]
    print(f"\n{bench} (median ms; ratio to peft in the same run):\n")
    print(provider_table(rows))
    skipped = data.get("skipped") or {r["provider"]: r["skipped"] for r in rows if "skipped" in r}
    for provider, why in skipped.items():
        print(f"- skipped {provider}: {why}")
PYEOF

if [ "$FAILED" -ne 0 ]; then
  echo "gpu_check: at least one step failed (logs in $OUT)"
  exit 1
fi
echo "gpu_check: all steps passed (logs in $OUT)"
