"""Microbenchmark of the LoRA linear layer: time and peak memory, forward / backward / both.

Providers (each run in this process, on the same inputs):
  base    the frozen base linear alone, ``F.linear(x, W, b)``: the floor
  peft    PEFT's ``lora.Linear`` layer (the baseline the ratios are taken against)
  unsloth a custom autograd LoRA of three ``addmm`` in the style of Unsloth's fast path
          (adapters in the base dtype, no dropout: Unsloth's fast path takes none); GPU default
  torch   ``LoRALinear`` on the torch backend of ``lora_kernels.lora_linear``
  triton  the same on the Triton kernels (CUDA tensors only)
  cuda    the same on the compiled extension (when it is built and runs here)

Modes: ``fwd`` (training-mode forward, autograd recording), ``bwd`` (backward of a stored
forward), ``full`` (both). In every mode the input requires grad (as inside a network), the base
weight is frozen and the adapters are trained.

    python benchmarks/bench_lora.py --device cpu                 # T=2048, in=out=1024, r=16
    python benchmarks/bench_lora.py --device cuda --dtype bfloat16
    python benchmarks/bench_lora.py --device cpu --quick         # a few seconds (make demo)
    python benchmarks/bench_lora.py --device cpu --plot benchmarks/results/lora_cpu.png

Prints a table (median and 20/80 % quantiles in ms, peak MiB, ratios against peft and base) and
writes JSON (default ``benchmarks/results/lora_<device>.json``, ``..._quick.json`` with --quick). On the CPU the providers are
timed interleaved, round by round, so that a noisy neighbour affects them alike.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (  # noqa: E402
    format_table,
    machine_info,
    peak_memory_bytes,
    summarize,
    time_ms,
    write_json,
)

from lora_kernels import backends  # noqa: E402
from lora_kernels.nn import LoRALinear  # noqa: E402

PROVIDERS = ("base", "peft", "unsloth", "torch", "triton", "cuda")
CPU_PROVIDERS = ("base", "peft", "torch")
MODES = ("fwd", "bwd", "full")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", "-T", type=int, default=None, help="rows of x (batch * seq)")
    ap.add_argument("--in-features", type=int, default=None)
    ap.add_argument("--out-features", type=int, default=None)
    ap.add_argument("--rank", "-r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                    help="base dtype (default float32 on cpu, bfloat16 on cuda); adapters fp32 over a half base, as PEFT")
    ap.add_argument("--providers", default=None,
                    help=f"default: {','.join(PROVIDERS)} on a GPU, {','.join(CPU_PROVIDERS)} on the CPU")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--reps", type=int, default=None, help="timed calls per provider (CPU)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default 1 on cpu: steadier on a shared machine)")
    ap.add_argument("--quick", action="store_true", help="small shape, few repetitions")
    ap.add_argument("--plot", default=None, help="also write a PNG bar chart here (needs matplotlib)")
    ap.add_argument("--json", default=None, help="output path (default benchmarks/results/lora_<device>.json)")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if args.quick:
        big = (256, 256, 256)
    else:
        big = (8192, 4096, 4096) if cuda else (2048, 1024, 1024)
    args.tokens = args.tokens or big[0]
    args.in_features = args.in_features or big[1]
    args.out_features = args.out_features or big[2]
    args.reps = args.reps or (5 if args.quick else 15)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.providers = args.providers or ",".join(PROVIDERS if cuda else CPU_PROVIDERS)
    return args


def _available(provider: str, device: torch.device) -> str | None:
    """None when the provider can run here, else why not."""
    if provider == "peft":
        try:
            import peft.tuners.lora  # noqa: F401
        except ImportError:
            return "peft is not installed"
    if provider in ("triton", "cuda"):
        if device.type != "cuda":
            return f"{provider} is benchmarked on CUDA tensors only"
        reasons = backends.available_reasons(provider, device)
        if reasons:
            return "; ".join(reasons)
    return None


class ThreeAddmmLoRA(torch.autograd.Function):
    """LoRA as three GEMMs forward (``x A^T``, the base ``addmm``, ``addmm_`` of the LoRA term
    with alpha = scaling), saving x and ``x A^T``; backward ``dY B``, ``dX = dY W`` with
    ``addmm_`` of ``dY B A``, ``dA``, ``dB``. Unsloth's fast-path style: no dropout."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling):
        xa = x @ lora_A.t()
        y = x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())
        y.addmm_(xa, lora_B.t(), alpha=scaling)
        ctx.save_for_backward(x, weight, lora_A, lora_B, xa)
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, xa = ctx.saved_tensors
        s = ctx.scaling
        dyb = dy @ lora_B
        dx = (dy @ weight).addmm_(dyb, lora_A, alpha=s)
        d_a = torch.mm(dyb.t(), x).mul_(s)
        d_b = torch.mm(dy.t(), xa).mul_(s)
        return dx, None, None, d_a, d_b, None


class UnslothStyleLoRA(nn.Module):
    """The frozen base and adapters in the base dtype, run by :class:`ThreeAddmmLoRA`."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base, self.scaling = base, alpha / r
        dtype, device = base.weight.dtype, base.weight.device
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features, dtype=dtype, device=device)
                                   / base.in_features**0.5)
        self.lora_B = nn.Parameter(torch.randn(base.out_features, r, dtype=dtype,
                                               device=device) * 0.02)

    def forward(self, x):
        lead = x.shape[:-1]
        y = ThreeAddmmLoRA.apply(x.reshape(-1, x.shape[-1]), self.base.weight, self.base.bias,
                                 self.lora_A, self.lora_B, self.scaling)
        return y.reshape(*lead, y.shape[-1])


def _make_layer(provider, base, args):
    if provider == "base":
        return base
    if provider == "unsloth":
        return UnslothStyleLoRA(copy.deepcopy(base), args.rank, args.alpha)
    if provider == "peft":
        from peft.tuners.lora import Linear, LoraConfig

        cfg = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout)
        layer = Linear(copy.deepcopy(base), "default", config=cfg, r=args.rank, lora_alpha=args.alpha)
        layer.lora_A["default"].float()  # fp32 adapters, as get_peft_model keeps them
        layer.lora_B["default"].float()
        return layer
    layer = LoRALinear.from_linear(copy.deepcopy(base), r=args.rank, lora_alpha=args.alpha,
                                   lora_dropout=args.dropout, backend=provider)
    with torch.no_grad():  # a non-zero B, so the LoRA branch does real work in every provider
        layer.lora_B.normal_(std=0.02)
    return layer


def _calls(layer, x, dy):
    """(fwd, bwd, full) closures for one layer."""
    params = [p for p in layer.parameters() if p.requires_grad]
    inputs = [x, *params]
    state = {}

    def fwd():
        return layer(x)

    def prepare_bwd():
        state["y"] = layer(x)

    def bwd():
        return torch.autograd.grad(state["y"], inputs, dy, retain_graph=True)

    def full():
        return torch.autograd.grad(layer(x), inputs, dy)

    return {"fwd": fwd, "bwd": bwd, "full": full}, prepare_bwd


def _interleaved_times(fns: dict, reps: int, device) -> dict:
    """CPU: warm each, then time them round-robin ``reps`` times."""
    samples = {name: [] for name in fns}
    for fn in fns.values():
        fn()
        fn()
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: summarize(s) for name, s in samples.items()}


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    torch.manual_seed(0)
    base = nn.Linear(args.in_features, args.out_features, device=device, dtype=dtype)
    base.requires_grad_(False)
    x = torch.randn(args.tokens, args.in_features, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(args.tokens, args.out_features, device=device, dtype=dtype)

    wanted = [p for p in args.providers.split(",") if p]
    skipped, layers = {}, {}
    for provider in wanted:
        if provider not in PROVIDERS:
            raise SystemExit(f"unknown provider {provider!r}; expected some of {PROVIDERS}")
        why = _available(provider, device)
        if why:
            skipped[provider] = why
        else:
            layers[provider] = _make_layer(provider, base, args).train()

    rows = []
    for mode in [m for m in args.modes.split(",") if m]:
        fns, prepared = {}, {}
        for provider, layer in layers.items():
            calls, prepare_bwd = _calls(layer, x, dy)
            if mode == "bwd":
                prepare_bwd()
            fns[provider] = calls[mode]
            prepared[provider] = prepare_bwd
        if device.type == "cuda":
            times = {p: time_ms(fn, device) for p, fn in fns.items()}
        else:
            times = _interleaved_times(fns, args.reps, device)
        for provider, fn in fns.items():
            if mode == "bwd":  # peak of the backward alone, its forward already stored
                prepared[provider]()
            peak = peak_memory_bytes(fn, device)
            rows.append({"mode": mode, "provider": provider, **times[provider],
                         "peak_mib": peak / 2**20})
        del fns, prepared  # the stored forwards of this mode go with them
    _add_ratios(rows)
    config = {k: getattr(args, k) for k in ("device", "tokens", "in_features", "out_features",
                                            "rank", "alpha", "dropout", "dtype", "reps", "quick")}
    config["torch_threads"] = torch.get_num_threads()
    return {"benchmark": "lora_linear", "machine": machine_info(device), "config": config,
            "skipped": skipped, "results": rows}


def _add_ratios(rows):
    by = {(r["mode"], r["provider"]): r for r in rows}
    for r in rows:
        for ref in ("peft", "base"):
            other = by.get((r["mode"], ref))
            if other:
                r[f"time_vs_{ref}"] = r["median_ms"] / other["median_ms"]
                r[f"mem_vs_{ref}"] = r["peak_mib"] / other["peak_mib"] if other["peak_mib"] else float("nan")


def plot(result: dict, path: str) -> Path:
    """Bar chart: median time and peak memory per mode and provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["results"]
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    width = 0.8 / len(providers)
    for ax, key, label in ((axes[0], "median_ms", "median time (ms)"), (axes[1], "peak_mib", "peak memory (MiB)")):
        for i, provider in enumerate(providers):
            vals = [next((r[key] for r in rows if r["mode"] == m and r["provider"] == provider), 0)
                    for m in modes]
            ax.bar([j + i * width for j in range(len(modes))], vals, width, label=provider)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(modes))], modes)
        ax.set_ylabel(label)
    axes[0].legend()
    cfg = result["config"]
    fig.suptitle(f"lora_linear T={cfg['tokens']} in={cfg['in_features']} out={cfg['out_features']} "
                 f"r={cfg['rank']} p={cfg['dropout']} {cfg['dtype']} ({cfg['device']})")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def main(argv=None) -> None:
    args = _parse(argv)
    result = run(args)
    cfg = result["config"]
    print(f"lora_linear: T={cfg['tokens']} in={cfg['in_features']} out={cfg['out_features']} "
          f"r={cfg['rank']} dropout={cfg['dropout']} dtype={cfg['dtype']} on {result['machine']['device']}")
    cols = ["mode", "provider", "median_ms", "q20_ms", "q80_ms", "peak_mib",
            "time_vs_peft", "mem_vs_peft", "time_vs_base", "mem_vs_base"]
    print(format_table(result["results"], cols))
    for provider, why in result["skipped"].items():
        print(f"skipped {provider}: {why}")
    device_kind = torch.device(args.device).type
    suffix = "_quick" if args.quick else ""  # a quick run never overwrites the full figures
    path = args.json or Path(__file__).resolve().parent / "results" / f"lora_{device_kind}{suffix}.json"
    print(f"wrote {write_json(path, result)}")
    if args.plot:
        print(f"wrote {plot(result, args.plot)}")


if __name__ == "__main__":
    main()
