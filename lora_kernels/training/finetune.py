"""``lora-kernels finetune``: one method on the user's local model folder and data file(s),
the same procedure as ``make demo``; saves the adapter in PEFT's format and a metrics JSON.

Data is read and checked before the model is loaded, so a bad file fails in a second with a
message that says what is wrong (:class:`~lora_kernels.training.data.DataError`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .data import DataError, label_names, load_records, split_records, tokenize
from .methods import METHODS, MethodConfig

DEFAULT_LR = {"full": 5e-5, "prompt": 3e-2, "prefix": 1e-2, "lora": 1e-3}
TASKS = ("classification", "causal-lm")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="local model folder (config.json, weights, tokenizer files)")
    p.add_argument("data", help="training data: a .jsonl or .csv file")
    p.add_argument("--validation", help="validation file (default: 10%% of DATA)")
    p.add_argument("--test", help="test file (default: 10%% of DATA)")
    p.add_argument("--task", choices=TASKS, default="classification")
    p.add_argument("--method", choices=METHODS, default="lora")
    p.add_argument("--text-field", default="text")
    p.add_argument("--label-field", default="label", help="class label field (classification)")
    p.add_argument("--out", default="out/finetune", help="output folder (adapter/, metrics.json)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=3)
    g.add_argument("--lr", type=float, default=None,
                   help="learning rate (default per method: " +
                   ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--max-length", type=int, default=128)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    m = p.add_argument_group("method")
    m.add_argument("--r", type=int, default=8, help="LoRA rank")
    m.add_argument("--lora-alpha", type=float, default=16)
    m.add_argument("--lora-dropout", type=float, default=0.1)
    m.add_argument("--target-modules", default="all-linear",
                   help="LoRA targets: comma-separated names, a regex, or all-linear")
    m.add_argument("--num-virtual-tokens", type=int, default=16, help="prompt / prefix length")
    m.add_argument("--prefix-projection", action="store_true",
                   help="prefix tuning through the reparameterisation MLP")
    m.add_argument("--impl", choices=["lora_kernels", "peft"], default="lora_kernels",
                   help=argparse.SUPPRESS)


def _target_modules(spec: str):
    if spec == "all-linear" or "," not in spec and any(c in spec for c in "*()[]|\\^$"):
        return spec
    return [s.strip() for s in spec.split(",") if s.strip()]


def load_splits(args) -> tuple[dict[str, list[dict]], list[str] | None]:
    """Read and check the data files; return the three splits and the label names."""
    label_field = args.label_field if args.task == "classification" else None
    train = load_records(args.data, args.text_field, label_field)
    val = load_records(args.validation, args.text_field, label_field) if args.validation else None
    test = load_records(args.test, args.text_field, label_field) if args.test else None
    if val is None or test is None:
        rest, v, t = split_records(train, 0.1 if val is None else 0.0, 0.1 if test is None else 0.0,
                                   seed=args.seed)
        train, val, test = rest, val if val is not None else v, test if test is not None else t
    labels = label_names(train, where=str(args.data)) if label_field else None
    return {"train": train, "validation": val, "test": test}, labels


def run(args: argparse.Namespace) -> int:
    """The ``finetune`` subcommand; returns the exit status (2 for bad data or arguments)."""
    try:
        splits, labels = load_splits(args)
    except DataError as e:
        print(f"lora-kernels finetune: error: {e}", file=sys.stderr)
        return 2
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        print(f"lora-kernels finetune: error: {model_dir} is not a model folder (no config.json)",
              file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from .env import machine_info
    from .loop import TrainConfig, fit
    from .methods import apply_method

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    label_ids = {name: i for i, name in enumerate(labels)} if labels else None
    try:
        tok = {k: tokenize(tokenizer, v, args.max_length, label_ids, where=f"{k} split")
               for k, v in splits.items()}
    except DataError as e:
        print(f"lora-kernels finetune: error: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    if labels:
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label_ids)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
    mcfg = MethodConfig(
        num_virtual_tokens=args.num_virtual_tokens, prefix_projection=args.prefix_projection,
        r=args.r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        target_modules=_target_modules(args.target_modules),
    )
    try:
        model = apply_method(model, args.method, mcfg, task=args.task, impl=args.impl)
    except (ValueError, TypeError) as e:
        print(f"lora-kernels finetune: error: {e}", file=sys.stderr)
        return 2
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.method]
    cfg = TrainConfig(epochs=args.epochs, lr=lr, batch_size=args.batch_size,
                      weight_decay=args.weight_decay, task=args.task, seed=args.seed,
                      device=device, progress=not args.no_progress)
    result = fit(model, tok["train"], tok["validation"], tok["test"], cfg,
                 pad_id=tokenizer.pad_token_id, desc=args.method)
    out = Path(args.out)
    saved = save_result(model, tokenizer, args.method, out / ("model" if args.method == "full" else "adapter"))
    result.update({"method": args.method, "task": args.task, "model": str(model_dir),
                   "labels": labels, "lr": lr, "saved": str(saved),
                   "sizes": {k: len(v) for k, v in splits.items()}, "machine": machine_info(device)})
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    t = result["test"]
    summary = (f"test accuracy {t['accuracy']:.4f}, macro-F1 {t['macro_f1']:.4f}" if labels
               else f"test loss {t['loss']:.4f}, perplexity {t['perplexity']:.2f}")
    print(f"{args.method}: {result['trainable_params']:,} trainable parameters "
          f"({100 * result['trainable_share']:.2f}%), best epoch {result['best_epoch']}, {summary}")
    print(f"saved {saved} and {out / 'metrics.json'}")
    return 0


def save_result(model, tokenizer, method: str, folder: Path) -> Path:
    """Full fine-tuning: the whole model (``save_pretrained``); otherwise the adapter in PEFT's
    format (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    folder.mkdir(parents=True, exist_ok=True)
    if method == "full":
        inner = model.base_model if hasattr(model, "save_adapter") else model  # TunedModel -> HF model
        inner.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    elif hasattr(model, "save_adapter"):
        model.save_adapter(folder)
    else:  # a PEFT model (impl="peft")
        model.save_pretrained(folder)
    return folder
