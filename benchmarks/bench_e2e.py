"""End-to-end benchmark: one training step (forward, loss, backward, AdamW step) of a GPT-2 and a
LLaMA model built from configs, for each tuning method, lora_kernels against PEFT (and plain
transformers for full fine-tuning), on the same model weights and the same batch, in one process.

Providers per method:
  full    plain (transformers, SDPA attention)   ours (tune(FullFineTuningConfig): fused attention)
  prompt  peft (PromptTuningConfig)              ours (tune(PromptTuningConfig))
  prefix  peft (PrefixTuningConfig: KV cache)    ours (tune(PrefixTuningConfig): prefix_attention)
  lora    peft (LoraConfig)                      ours (tune(LoraConfig): lora_linear)
          peft+accel (the same PEFT model after lora_kernels.integrations.peft.accelerate)

Runs alternate round by round (provider A, B, C, A, B, C, ...) so that a noisy neighbour affects
all alike; the figure is the median step time over the rounds, and the peak memory one step adds
over what was live before it (inputs, weights and optimizer state excluded; activations,
gradients and temporaries included; see ``benchmarks/common.py``). Ratios are against the
baseline (peft, or plain for full fine-tuning).

    python benchmarks/bench_e2e.py                         # CPU: batch 8, length 256, 4 layers, width 512
    python benchmarks/bench_e2e.py --device cuda --dtype bfloat16
    python benchmarks/bench_e2e.py --quick                 # tiny shapes, seconds (tests, smoke)

Writes ``benchmarks/results/e2e_<device>.json`` and ``.png`` and prints the tables (Markdown).
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import machine_info, peak_memory_bytes, summarize, write_json  # noqa: E402

METHODS = ("full", "prompt", "prefix", "lora")
BASELINE = {"full": "plain", "prompt": "peft", "prefix": "peft", "lora": "peft"}


def build_base(family: str, layers: int, width: int, vocab: int, seq: int):
    import transformers

    if family == "gpt2":
        cfg = transformers.GPT2Config(n_layer=layers, n_embd=width, n_head=width // 64, vocab_size=vocab,
                                      n_positions=seq + 64, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0, attn_implementation="sdpa")
        return transformers.GPT2LMHeadModel(cfg)
    cfg = transformers.LlamaConfig(num_hidden_layers=layers, hidden_size=width,
                                   intermediate_size=int(width * 8 / 3) // 64 * 64,
                                   num_attention_heads=width // 64, num_key_value_heads=width // 128,
                                   vocab_size=vocab, max_position_embeddings=seq + 64,
                                   attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(cfg)


LORA_TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"],
                "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def make_provider(base, family: str, method: str, provider: str, args):
    """A fresh copy of ``base`` prepared for (method, provider)."""
    model = copy.deepcopy(base)
    if method == "full":
        if provider == "plain":
            return model
        import lora_kernels as lk

        return lk.tune(model, lk.FullFineTuningConfig())
    if provider in ("peft", "peft+accel"):
        import peft

        if method == "prompt":
            cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.virtual_tokens)
        elif method == "prefix":
            cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.virtual_tokens)
        else:
            cfg = peft.LoraConfig(task_type="CAUSAL_LM", r=args.r, lora_alpha=2 * args.r,
                                  lora_dropout=args.lora_dropout, target_modules=LORA_TARGETS[family])
        model = peft.get_peft_model(model, cfg)
        if provider == "peft+accel":
            from lora_kernels.integrations.peft import accelerate

            accelerate(model)
        return model
    import lora_kernels as lk

    if method == "prompt":
        cfg = lk.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.virtual_tokens)
    elif method == "prefix":
        cfg = lk.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.virtual_tokens)
    else:
        cfg = lk.LoraConfig(task_type="CAUSAL_LM", r=args.r, lora_alpha=2 * args.r,
                            lora_dropout=args.lora_dropout, target_modules=LORA_TARGETS[family])
    return lk.tune(model, cfg)


def providers_for(method: str) -> list[str]:
    return {"full": ["plain", "ours"], "lora": ["peft", "ours", "peft+accel"]}.get(method, ["peft", "ours"])


def make_step(model, batch, device):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)

    def step():
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step, sum(p.numel() for p in params)


def run_family(family: str, args, device, dtype) -> list[dict]:
    torch.manual_seed(0)
    base = build_base(family, args.layers, args.width, args.vocab, args.seq).to(device, dtype)
    base.train()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    rows = []
    for method in args.methods:
        names = providers_for(method)
        steps = {}
        for name in names:
            model = make_provider(base, family, method, name, args).to(device)
            model.train()
            steps[name] = (model, *make_step(model, batch, device))
        for name in names:  # warm-up (optimizer state allocated)
            for _ in range(args.warmup):
                steps[name][1]()
        samples = {n: [] for n in names}
        for _ in range(args.reps):
            for name in names:
                t0 = time.perf_counter()
                steps[name][1]()
                samples[name].append((time.perf_counter() - t0) * 1e3)
        mem = {n: peak_memory_bytes(steps[n][1], device) for n in names}
        base_name = BASELINE[method]
        for name in names:
            s = summarize(samples[name])
            rows.append({
                "model": family, "method": method, "provider": name, "trainable": steps[name][2],
                **s, "peak_mib": mem[name] / 2**20,
                "time_ratio": s["median_ms"] / summarize(samples[base_name])["median_ms"],
                "mem_ratio": mem[name] / max(mem[base_name], 1),
            })
            print(f"{family:<6} {method:<7} {name:<11} {s['median_ms']:9.1f} ms  "
                  f"{mem[name] / 2**20:8.1f} MiB  x{rows[-1]['time_ratio']:.3f} time  "
                  f"x{rows[-1]['mem_ratio']:.3f} memory", flush=True)
        del steps
        gc.collect()
    return rows


def markdown(rows: list[dict]) -> str:
    head = "| model | method | provider | trainable | median ms | q20-q80 ms | peak MiB | time vs baseline | memory vs baseline |"
    lines = [head, "|" + " --- |" * 9]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['provider']} | {r['trainable']:,} | "
                     f"{r['median_ms']:.1f} | {r['q20_ms']:.1f}-{r['q80_ms']:.1f} | {r['peak_mib']:.1f} | "
                     f"{r['time_ratio']:.3f} | {r['mem_ratio']:.3f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ours = [r for r in rows if r["provider"] != BASELINE[r["method"]]]
    labels = [f"{r['model']}\n{r['method']}\n{r['provider']}" for r in ours]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 0.9 * len(ours) + 3), 4.5))
    for ax, key, name in ((axes[0], "time_ratio", "step time"), (axes[1], "mem_ratio", "peak memory")):
        ax.bar(range(len(ours)), [r[key] for r in ours],
               color=["tab:blue" if r["provider"] == "ours" else "tab:green" for r in ours])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(ours)), labels, fontsize=7)
        ax.set_ylabel(f"{name} / baseline (lower is better)")
        ax.set_title(f"{name} relative to PEFT (plain transformers for full)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--models", nargs="+", default=["gpt2", "llama"], choices=["gpt2", "llama"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--lora-dropout", type=float, default=0.1)
    ap.add_argument("--virtual-tokens", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (2 layers, width 128, batch 2, length 32)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.width, args.batch, args.seq, args.vocab, args.reps = 2, 128, 2, 32, 512, 3
        args.r, args.virtual_tokens = 4, 4
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = []
    t0 = time.perf_counter()
    for family in args.models:
        rows += run_family(family, args, device, dtype)
    tag = f"e2e_{device.type}{'_quick' if args.quick else ''}"
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / f"{tag}.json"
    import lora_kernels

    settings = {k: getattr(args, k) for k in ("layers", "width", "vocab", "batch", "seq", "r", "lora_dropout",
                                               "virtual_tokens", "warmup", "reps", "dtype")}
    backends = {op: lora_kernels.backends.describe() for op in ("lora_linear",)} if hasattr(
        lora_kernels.backends, "describe") else {}
    write_json(out, {"settings": settings, "machine": machine_info(device), "rows": rows,
                     "backends": backends, "wall_seconds": time.perf_counter() - t0})
    title = (f"{args.layers} layers, width {args.width}, vocab {args.vocab}, batch {args.batch} x {args.seq}, "
             f"{args.dtype}, {machine_info(device)['device']}")
    plot(rows, out.with_suffix(".png"), title)
    print()
    print(markdown(rows))
    print(f"\n{title}; wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
