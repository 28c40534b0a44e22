"""Microbenchmark of prefix_attention against the real competitors of prefix tuning.

Providers:
  flash   SDPA's flash kernel over keys/values concatenated with the prefix (expanded per row),
          no explicit mask: bottom-right causal through torch.nn.attention.bias.causal_lower_right
          (plain is_causal when Lq == P + Lk), grouped-query heads through enable_gqa. The best
          a hand-written SDPA call reaches; on a GPU skipped where flash does not serve.
  peft    what PEFT's prefix tuning amounts to in transformers: the prefix in the key/value
          cache (concatenated, expanded per row), an explicit boolean mask (bottom-right causal,
          prefix always visible), repeat_kv for grouped-query heads, SDPA (the baseline).
  torch   lora_kernels.prefix_attention(backend="torch"): on the CPU the split flash path (no
          concatenation); on CUDA SDPA's fused kernels (lora_kernels.reference.prefix_attention_sdpa).
  triton  backend="triton" (CUDA tensors only).
  cuda    backend="cuda" (when the compiled extension serves the inputs).
Modes: fwd (no autograd), bwd (backward only, the forward graph kept), full (forward + backward).
Reports the median and 20/80 % quantiles (ms), the peak memory the call adds (MiB), TFLOP/s on
a GPU, and each provider's time relative to peft (and to flash when it ran) measured in the
same process. Writes a table to stdout and JSON to
benchmarks/results/prefix_attention_<device>.json.

    python benchmarks/bench_prefix_attention.py --device cpu
    python benchmarks/bench_prefix_attention.py --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import (  # noqa: E402
    format_table,
    machine_info,
    peak_memory_bytes,
    time_ms,
    write_json,
)

from lora_kernels import backends, prefix_attention  # noqa: E402
from lora_kernels.reference.prefix_attention import flops  # noqa: E402

# (B, Hq, Hkv, L, P, D): GPT-2-small-like and a grouped-query shape on the CPU; a
# LLaMA-8B-like prefix-tuning shape on a GPU.
CPU_SHAPES = [(8, 8, 8, 256, 32, 64), (4, 8, 2, 512, 32, 64)]
GPU_SHAPES = [(8, 32, 8, 1024, 32, 128), (4, 32, 8, 2048, 32, 128)]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


CPU_PROVIDERS = ["peft", "torch"]
GPU_PROVIDERS = ["flash", "peft", "torch", "triton", "cuda"]


def _concat(prefix, seq):
    B, Hkv, _, D = seq.shape
    return torch.cat([prefix.expand(B, Hkv, prefix.shape[-2], D), seq], 2)


def sdpa_peft_like(q, k, v, prefix_k, prefix_v, causal=True):
    """PEFT's route: prefix expanded per row and concatenated, explicit mask, repeat_kv."""
    B, Hq, L, D = q.shape
    Hkv, P = k.shape[1], prefix_k.shape[-2]
    keys, values = _concat(prefix_k, k), _concat(prefix_v, v)
    keep = torch.ones(L, L, dtype=torch.bool, device=q.device)
    keep = keep.tril() if causal else keep
    mask = torch.cat([torch.ones(L, P, dtype=torch.bool, device=q.device), keep], 1)
    g = Hq // Hkv
    if g > 1:
        keys, values = keys.repeat_interleave(g, 1), values.repeat_interleave(g, 1)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask.expand(B, 1, L, L + P))


def sdpa_flash(q, k, v, prefix_k, prefix_v, causal=True):
    """SDPA over the concatenated keys without a mask: bottom-right causal as a CausalBias
    (flash's own causal mask when Lq != P + Lk), grouped heads in place. On CUDA only the flash
    kernel may serve it (anything else raises)."""
    keys, values = _concat(prefix_k, k), _concat(prefix_v, v)
    mask = causal_lower_right(q.shape[2], keys.shape[2]) if causal else None
    gqa = q.shape[1] != k.shape[1]
    if q.device.type != "cuda":
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa)


def make_call(provider, q, k, v, prefix_k, prefix_v):
    if provider == "peft":
        return lambda: sdpa_peft_like(q, k, v, prefix_k, prefix_v)
    if provider == "flash":
        return lambda: sdpa_flash(q, k, v, prefix_k, prefix_v)
    return lambda: prefix_attention(q, k, v, prefix_k, prefix_v, causal=True, backend=provider)


def available(provider, q, k, v, prefix_k, prefix_v) -> str | None:
    """None when the provider can run these inputs, else why not."""
    if provider == "flash":
        if q.device.type != "cuda":
            return None
        keys = _concat(prefix_k, k)
        params = torch.backends.cuda.SDPAParams(q, keys, keys, None, 0.0, False,
                                                q.shape[1] != k.shape[1])
        if not torch.backends.cuda.can_use_flash_attention(params):
            return "SDPA's flash kernel does not serve these inputs"
        return None
    if provider == "peft":
        return None
    reasons = backends.not_supported_reasons(
        "prefix_attention", provider, q.device, q=q, k=k, v=v, prefix_k=prefix_k[None],
        prefix_v=prefix_v[None], key_padding_mask=None, causal=True, dropout_p=0.0,
        training=True)
    if provider == "triton" and q.device.type != "cuda":
        reasons = reasons or ["triton is benchmarked on CUDA tensors only"]
    return "; ".join(reasons) or None


def make_fn(provider, mode, inputs):
    """The call to measure: fwd (no autograd), bwd (backward of a kept graph), full."""
    q, k, v, pk, pv = inputs
    call = make_call(provider, q, k, v, pk, pv)
    dout = torch.randn_like(q)
    params = [q, k, v, pk, pv]
    if mode == "fwd":
        def fn():
            with torch.no_grad():
                call()
    elif mode == "full":
        def fn():
            torch.autograd.grad(call(), params, dout)
    else:
        out = call()

        def fn():
            torch.autograd.grad(out, params, dout, retain_graph=True)
    fn()
    return fn


def make_inputs(shape, device, dtype):
    B, Hq, Hkv, L, P, D = shape
    gen = torch.Generator(device="cpu").manual_seed(0)
    sizes = [(B, Hq, L, D), (B, Hkv, L, D), (B, Hkv, L, D), (Hkv, P, D), (Hkv, P, D)]
    inputs = [torch.randn(*s, generator=gen).to(device=device, dtype=dtype) for s in sizes]
    return [t.requires_grad_() for t in inputs]


def shape_name(shape) -> str:
    B, Hq, Hkv, L, P, D = shape
    return f"B{B} H{Hq}/{Hkv} L{L} P{P} D{D}"


def run(args):
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    shapes = [tuple(s) for s in args.shape] if args.shape else (
        GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)
    providers = args.providers
    cases = [(shape, mode) for shape in shapes for mode in args.modes]
    skipped, memory = {}, {}
    # 1. peak memory of every case
    for shape, mode in cases:
        inputs = make_inputs(shape, device, dtype)
        for p in providers:
            why = available(p, *inputs)
            if why:
                skipped[(shape, p)] = why
                continue
            memory[(shape, mode, p)] = peak_memory_bytes(make_fn(p, mode, inputs), device)
        del inputs
    # 2. times: rounds alternate the providers, so that a noisy machine hits them alike; per
    # round a median over reps; reported: the median (and median quantiles) over the rounds
    rows = []
    for shape, mode in cases:
        inputs = make_inputs(shape, device, dtype)
        live = [p for p in providers if (shape, p) not in skipped]
        fns = {p: make_fn(p, mode, inputs) for p in live}
        samples = {p: [] for p in live}
        for _ in range(args.rounds):
            for p in live:
                samples[p].append(time_ms(fns[p], device, warmup=2, reps=args.reps))
        block = []
        for p in providers:
            if p not in live:
                block.append(dict(shape=shape_name(shape), mode=mode, provider=p,
                                  skipped=skipped[(shape, p)]))
                continue
            t = {key: statistics.median(s[key] for s in samples[p])
                 for key in ("median_ms", "q20_ms", "q80_ms")}
            row = dict(shape=shape_name(shape), mode=mode, provider=p, **t,
                       peak_mib=memory[(shape, mode, p)] / 2**20)
            if device.type == "cuda":
                work = flops(shape[0], shape[1], shape[3], shape[3], shape[4], shape[5],
                             causal=True) * {"fwd": 1.0, "bwd": 2.5, "full": 3.5}[mode]
                row["tflops"] = work / (t["median_ms"] * 1e-3) / 1e12
            block.append(row)
        for ref in ("peft", "flash"):
            base = next((r for r in block if r["provider"] == ref and "median_ms" in r), None)
            for r in block:
                if base is not None and "median_ms" in r:
                    r[f"vs_{ref}"] = r["median_ms"] / base["median_ms"]
        rows += block
        del fns, inputs
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                    help="default: bf16 on a GPU, fp32 on the CPU")
    ap.add_argument("--providers", nargs="+", default=None,
                    help=f"default: {' '.join(GPU_PROVIDERS)} on a GPU, "
                         f"{' '.join(CPU_PROVIDERS)} on the CPU")
    ap.add_argument("--modes", nargs="+", default=["fwd", "bwd", "full"],
                    choices=["fwd", "bwd", "full"])
    ap.add_argument("--shape", nargs=6, type=int, action="append",
                    metavar=("B", "HQ", "HKV", "L", "P", "D"))
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds (CPU: 3)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: PyTorch's choice)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    args.rounds = args.rounds or (1 if device.type == "cuda" else 3)
    args.providers = args.providers or (GPU_PROVIDERS if device.type == "cuda" else CPU_PROVIDERS)
    rows = run(args)
    cols = ["shape", "mode", "provider", "median_ms", "q20_ms", "q80_ms", "peak_mib", "vs_peft"]
    if "flash" in args.providers:
        cols.append("vs_flash")
    if device.type == "cuda":
        cols.insert(6, "tflops")
    print(format_table([r for r in rows if "median_ms" in r], cols))
    for r in rows:
        if "skipped" in r:
            print(f"skipped {r['provider']} {r['mode']} {r['shape']}: {r['skipped']}")
    out = Path(args.out or Path(__file__).parent / "results" /
               f"prefix_attention_{device.type}.json")
    payload = dict(benchmark="prefix_attention", dtype=args.dtype, causal=True,
                   cpu_allocator="timed with glibc M_MMAP_THRESHOLD=32 MiB (steady state), "
                                 "memory measured with 64 KiB as benchmarks/common.py",
                   command=" ".join(["python", "benchmarks/bench_prefix_attention.py",
                                     *(argv if argv is not None else sys.argv[1:])]),
                   machine=machine_info(device), rows=rows)
    print(f"wrote {write_json(out, payload)}")


if __name__ == "__main__":
    main()
