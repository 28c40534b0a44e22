"""Microbenchmark of prefix_attention against the way PEFT's prefix tuning ends up computing it.

Providers:
  sdpa    PyTorch SDPA on keys/values concatenated with the prefix expanded per batch row,
          an explicit boolean mask (bottom-right causal, prefix always visible), repeat_kv for
          grouped-query heads: what PEFT's KV-cache route amounts to (the baseline).
  torch   lora_kernels.prefix_attention(backend="torch"): the split flash path, no concatenation.
  triton  backend="triton" (CUDA tensors only).
  cuda    backend="cuda" (when the compiled extension serves the inputs).
Modes: fwd (no autograd), bwd (backward only, the forward graph kept), full (forward + backward).
Reports the median and 20/80 % quantiles (ms), the peak memory the call adds (MiB), TFLOP/s on
a GPU, and each provider's time relative to sdpa measured in the same process. Writes a table
to stdout and JSON to benchmarks/results/prefix_attention_<device>.json.

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
GPU_SHAPES = [(8, 32, 8, 1024, 32, 128), (4, 32, 8, 2048, 32, 128), (16, 16, 16, 512, 16, 64)]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def sdpa_peft_like(q, k, v, prefix_k, prefix_v, causal=True):
    """PEFT's route: prefix expanded per row and concatenated, explicit mask, repeat_kv."""
    B, Hq, L, D = q.shape
    Hkv, P = k.shape[1], prefix_k.shape[-2]
    keys = torch.cat([prefix_k.expand(B, Hkv, P, D), k], 2)
    values = torch.cat([prefix_v.expand(B, Hkv, P, D), v], 2)
    keep = torch.ones(L, L, dtype=torch.bool, device=q.device)
    keep = keep.tril() if causal else keep
    mask = torch.cat([torch.ones(L, P, dtype=torch.bool, device=q.device), keep], 1)
    g = Hq // Hkv
    if g > 1:
        keys, values = keys.repeat_interleave(g, 1), values.repeat_interleave(g, 1)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask.expand(B, 1, L, L + P))


def make_call(provider, q, k, v, prefix_k, prefix_v):
    if provider == "sdpa":
        return lambda: sdpa_peft_like(q, k, v, prefix_k, prefix_v)
    return lambda: prefix_attention(q, k, v, prefix_k, prefix_v, causal=True, backend=provider)


def available(provider, q, k, v, prefix_k, prefix_v) -> str | None:
    """None when the provider can run these inputs, else why not."""
    if provider == "sdpa":
        return None
    reasons = backends.not_supported_reasons(
        "prefix_attention", provider, q.device, q=q, k=k, v=v, prefix_k=prefix_k[None],
        prefix_v=prefix_v[None], key_padding_mask=None, causal=True, dropout_p=0.0,
        training=True)
    if provider == "triton" and q.device.type != "cuda":
        reasons = reasons or ["triton is benchmarked on CUDA tensors only"]
    return "; ".join(reasons) or None


def bench_one(provider, mode, inputs, device, reps):
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
    timing = time_ms(fn, device, warmup=2, reps=reps)
    return fn, timing


def run(args):
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    shapes = args.shape or (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)
    providers = args.providers
    rows = []
    for B, Hq, Hkv, L, P, D in shapes:
        gen = torch.Generator(device="cpu").manual_seed(0)
        sizes = [(B, Hq, L, D), (B, Hkv, L, D), (B, Hkv, L, D), (Hkv, P, D), (Hkv, P, D)]
        inputs = [torch.randn(*s, generator=gen).to(device=device, dtype=dtype) for s in sizes]
        for t in inputs:
            t.requires_grad_()
        fwd_flops = flops(B, Hq, L, L, P, D, causal=True)
        for mode in args.modes:
            samples = {p: [] for p in providers}
            skipped = {}
            fns = {}
            # rounds alternate the providers, so that a noisy machine hits them alike
            for _ in range(args.rounds):
                for p in providers:
                    if p in skipped:
                        continue
                    why = available(p, *inputs)
                    if why:
                        skipped[p] = why
                        continue
                    fns[p], timing = bench_one(p, mode, inputs, device, args.reps)
                    samples[p].append(timing)
            shape = f"B{B} H{Hq}/{Hkv} L{L} P{P} D{D}"
            block = []
            for p in providers:
                if p in skipped:
                    block.append(dict(shape=shape, mode=mode, provider=p, skipped=skipped[p]))
                    continue
                # per round a median over reps; reported: the median (and the median
                # quantiles) over the rounds
                t = {key: statistics.median(s[key] for s in samples[p])
                     for key in ("median_ms", "q20_ms", "q80_ms")}
                mem = peak_memory_bytes(fns[p], device) / 2**20
                row = dict(shape=shape, mode=mode, provider=p, **t, peak_mib=mem)
                if device.type == "cuda":
                    work = fwd_flops * {"fwd": 1.0, "bwd": 2.5, "full": 3.5}[mode]
                    row["tflops"] = work / (t["median_ms"] * 1e-3) / 1e12
                block.append(row)
            base = next((r for r in block if r["provider"] == "sdpa" and "median_ms" in r), None)
            for r in block:
                if base is not None and "median_ms" in r:
                    r["vs_sdpa"] = r["median_ms"] / base["median_ms"]
            rows += block
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                    help="default: bf16 on a GPU, fp32 on the CPU")
    ap.add_argument("--providers", nargs="+", default=["sdpa", "torch", "triton", "cuda"])
    ap.add_argument("--modes", nargs="+", default=["fwd", "bwd", "full"],
                    choices=["fwd", "bwd", "full"])
    ap.add_argument("--shape", nargs=6, type=int, action="append",
                    metavar=("B", "HQ", "HKV", "L", "P", "D"))
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds (CPU: 3)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    args.rounds = args.rounds or (1 if device.type == "cuda" else 3)
    rows = run(args)
    cols = ["shape", "mode", "provider", "median_ms", "q20_ms", "q80_ms", "peak_mib", "vs_sdpa"]
    if device.type == "cuda":
        cols.insert(6, "tflops")
    print(format_table([r for r in rows if "median_ms" in r], cols))
    for r in rows:
        if "skipped" in r:
            print(f"skipped {r['provider']} {r['mode']} {r['shape']}: {r['skipped']}")
    out = Path(args.out or Path(__file__).parent / "results" /
               f"prefix_attention_{device.type}.json")
    payload = dict(benchmark="prefix_attention", dtype=args.dtype, causal=True,
                   command=" ".join(["python", "benchmarks/bench_prefix_attention.py",
                                     *(argv if argv is not None else sys.argv[1:])]),
                   machine=machine_info(device), rows=rows)
    print(f"wrote {write_json(out, payload)}")


if __name__ == "__main__":
    main()
