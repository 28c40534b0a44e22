"""``lora-kernels finetune``: one method on the user's local model folder and data file(s), the
same procedure as ``make demo``; saves the adapter in PEFT's format (the whole model for full
fine-tuning), ``metrics.json``, ``training.png`` and a checkpoint per epoch (``--resume``).

Every argument and the data are checked before the model is loaded: a bad one raises
:class:`~lora_kernels.training.arguments.UsageError` or
:class:`~lora_kernels.training.data.DataError` with a one-line message (exit status 2 in the
CLI) and nothing is written.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path

from .arguments import (
    UsageError,
    check_backend,
    check_device,
    check_model_folder,
    check_output_folder,
    non_negative_float,
    positive_float,
    positive_int,
    probability,
)
from .data import label_names, load_records, split_records, tokenize
from .methods import METHODS, MethodConfig

DEFAULT_LR = {"full": 5e-5, "prompt": 3e-2, "prefix": 1e-2, "lora": 1e-3}
TASKS = ("classification", "causal-lm")
BACKEND_CHOICES = ("auto", "torch", "triton", "cuda")
METHOD_NAMES = {"full": "full fine-tuning", "prompt": "prompt tuning", "prefix": "prefix tuning",
                "lora": "LoRA"}
# What a run writes into --out (and --overwrite removes); nothing else there is touched.
OUTPUTS = ("adapter", "model", "checkpoints", "metrics.json", "training.png", "run.json",
           "predictions.jsonl")
# Arguments that may change between a run and its --resume.
RESUMABLE_CHANGES = {"resume", "overwrite", "no_progress", "device", "backend", "func", "command"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="local model folder (config.json, weights, tokenizer files)")
    p.add_argument("data", help="training data: a .jsonl or .csv file")
    p.add_argument("--validation", help="validation file (default: 10%% of DATA)")
    p.add_argument("--test", help="test file (default: 10%% of DATA)")
    p.add_argument("--task", choices=TASKS, default="classification", help="what to train")
    p.add_argument("--method", choices=METHODS, default="lora", help="tuning method")
    p.add_argument("--text-field", default="text", help="field holding the text")
    p.add_argument("--label-field", default="label", help="class label field (classification)")
    p.add_argument("--out", default="out/finetune",
                   help="output folder: adapter/ (or model/), metrics.json, training.png, "
                   "run.json, checkpoints/")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (same arguments)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=positive_int, default=3, help="passes over the training data")
    g.add_argument("--lr", type=positive_float, default=None,
                   help="learning rate (default per method: " +
                   ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    g.add_argument("--batch-size", type=positive_int, default=16, help="training batch size")
    g.add_argument("--max-length", type=positive_int, default=128,
                   help="tokens per example (longer texts are truncated)")
    g.add_argument("--weight-decay", type=non_negative_float, default=0.01, help="AdamW decay")
    g.add_argument("--seed", type=int, default=0, help="seed of the split, order and init")
    g.add_argument("--device", default="auto", help="auto (cuda when a GPU is visible), cpu, "
                   "cuda or cuda:N")
    g.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                   help="kernels for the fused ops (auto: the fastest validated one that serves "
                   "each call; an explicit one must serve every call)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    m = p.add_argument_group("method")
    m.add_argument("--r", type=positive_int, default=8, help="LoRA rank")
    m.add_argument("--lora-alpha", type=positive_float, default=16, help="LoRA scale numerator")
    m.add_argument("--lora-dropout", type=probability, default=0.1, help="LoRA input dropout")
    m.add_argument("--target-modules", default="all-linear",
                   help="LoRA targets: comma-separated names, a regex, or all-linear")
    m.add_argument("--num-virtual-tokens", type=positive_int, default=16,
                   help="prompt / prefix length")
    m.add_argument("--prefix-projection", action="store_true",
                   help="prefix tuning through the reparameterisation MLP")
    m.add_argument("--impl", choices=["lora_kernels", "peft"], default="lora_kernels",
                   help=argparse.SUPPRESS)


def _target_modules(spec: str):
    if spec == "all-linear" or "," not in spec and any(c in spec for c in "*()[]|\\^$"):
        return spec
    return [s.strip() for s in spec.split(",") if s.strip()]


def _sha256(path: str | None) -> str | None:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else None


def run_arguments(args: argparse.Namespace) -> dict:
    """The arguments that define a run (what ``--resume`` must repeat)."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in RESUMABLE_CHANGES}


def check_arguments(args: argparse.Namespace) -> str:
    """Every check that needs neither the data nor the model; returns the device string."""
    out = Path(args.out)
    check_output_folder(out, overwrite=args.overwrite, resume=args.resume)
    if args.task == "classification" and args.text_field == args.label_field:
        raise UsageError(f"--text-field and --label-field are both {args.text_field!r}")
    if args.task == "causal-lm" and args.max_length < 2:
        raise UsageError("--max-length: a causal LM needs at least 2 tokens per example, got "
                         f"{args.max_length}")
    if not _target_modules(args.target_modules):
        raise UsageError(f"--target-modules: no module names in {args.target_modules!r}")
    if args.impl == "peft" and importlib.util.find_spec("peft") is None:
        raise UsageError("--impl peft: peft is not installed")
    device = check_device(args.device)
    check_backend(args.backend, device)
    if args.resume:
        _check_resumable(out, args)
    return device


def _check_resumable(out: Path, args: argparse.Namespace) -> None:
    from .checkpoint import Checkpointer

    if (out / "metrics.json").is_file():
        raise UsageError(f"--resume: the run in {out} has finished (metrics.json); pass "
                         "--overwrite to train again")
    try:
        saved = json.loads((out / "run.json").read_text())["arguments"]
    except (OSError, ValueError, KeyError):
        raise UsageError(f"--resume: {out} holds no run of lora-kernels finetune (no run.json)") from None
    now = run_arguments(args)
    changed = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if changed:
        diffs = ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:4])
        raise UsageError(f"--resume: the run in {out} was started with other arguments ({diffs}); "
                         "repeat them, or pass --overwrite to start again")
    data_sha = json.loads((out / "run.json").read_text()).get("data_sha256", {})
    edited = [k for k, digest in data_sha.items() if digest != _sha256(getattr(args, k))]
    if edited:
        raise UsageError(f"--resume: {', '.join(getattr(args, k) for k in edited)} changed since the "
                         f"run in {out} started; pass --overwrite to start again")
    if Checkpointer(out / "checkpoints").latest() is None:
        raise UsageError(f"--resume: {out} has no checkpoint yet (the run stopped during its first "
                         "epoch); start again with --overwrite")


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


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError) as e:
        raise UsageError(f"cannot load a tokenizer from {model_dir}: {e}") from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_dir: Path, labels: list[str] | None, pad_token_id: int | None):
    """A sequence classifier with a new head for ``labels``, or a causal LM (``labels`` None)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    try:
        if labels is None:
            return AutoModelForCausalLM.from_pretrained(model_dir)
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)})
    except (OSError, ValueError, TypeError) as e:
        raise UsageError(f"cannot load the model from {model_dir}: {e}") from e
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    return model


def run(args: argparse.Namespace) -> int:
    """The ``finetune`` sub-command; returns the exit status. Bad arguments or data raise
    ``UsageError`` / ``DataError`` (the CLI prints them, exit status 2); an interrupted run
    returns 130 and can be continued with ``--resume``."""
    device = check_arguments(args)
    splits, labels = load_splits(args)
    model_dir = check_model_folder(args.model)
    import lora_kernels

    lora_kernels.set_backend(args.backend)  # process-wide, as the command line asks
    return _train(args, device, splits, labels, model_dir)


def _train(args, device, splits, labels, model_dir) -> int:
    import torch

    from .checkpoint import Checkpointer
    from .loop import TrainConfig, fit
    from .methods import apply_method

    if args.no_progress:  # transformers' own bars too (loading weights)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    tokenizer = load_tokenizer(model_dir)
    label_ids = {name: i for i, name in enumerate(labels)} if labels else None
    tok = {k: tokenize(tokenizer, v, args.max_length, label_ids, where=f"{k} split")
           for k, v in splits.items()}
    torch.manual_seed(args.seed)
    model = load_model(model_dir, labels, tokenizer.pad_token_id)
    mcfg = MethodConfig(
        num_virtual_tokens=args.num_virtual_tokens, prefix_projection=args.prefix_projection,
        r=args.r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        target_modules=_target_modules(args.target_modules),
    )
    try:
        model = apply_method(model, args.method, mcfg, task=args.task, impl=args.impl)
    except (ValueError, TypeError) as e:
        raise UsageError(f"--method {args.method}: {e}") from e
    out = Path(args.out)
    if not args.resume:
        _start_run(out, args, labels)
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.method]
    cfg = TrainConfig(epochs=args.epochs, lr=lr, batch_size=args.batch_size,
                      weight_decay=args.weight_decay, task=args.task, seed=args.seed,
                      device=device, progress=not args.no_progress)
    try:
        result = fit(model, tok["train"], tok["validation"], tok["test"], cfg,
                     pad_id=tokenizer.pad_token_id, desc=args.method,
                     checkpointer=Checkpointer(out / "checkpoints"), resume=args.resume)
    except KeyboardInterrupt:
        print(f"\ninterrupted; the last finished epoch is saved in {out / 'checkpoints'}: run the "
              "same command with --resume to continue", file=sys.stderr)
        return 130
    _finish_run(out, args, model, tokenizer, result, labels, lr, splits, device)
    return 0


def _start_run(out: Path, args: argparse.Namespace, labels: list[str] | None) -> None:
    """Clear a previous run's outputs (``--overwrite``) and record this run's arguments."""
    for name in OUTPUTS:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    data_sha = {k: _sha256(getattr(args, k)) for k in ("data", "validation", "test")}
    (out / "run.json").write_text(json.dumps(
        {"arguments": run_arguments(args), "labels": labels, "data_sha256": data_sha}, indent=2) + "\n")


def _finish_run(out, args, model, tokenizer, result, labels, lr, splits, device) -> None:
    from .env import machine_info, portable_path
    from .plots import plot_runs

    saved = save_result(model, tokenizer, args.method, out / ("model" if args.method == "full" else "adapter"))
    result.update({"method": args.method, "task": args.task, "model": portable_path(args.model),
                   "labels": labels, "lr": lr, "backend": args.backend, "saved": saved.name,
                   "sizes": {k: len(v) for k, v in splits.items()}, "machine": machine_info(device)})
    (out / "metrics.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    title = f"{METHOD_NAMES[args.method]} of {Path(args.model).name} on {Path(args.data).name}"
    figure = plot_runs({METHOD_NAMES[args.method]: result}, out / "training.png", title=title,
                       accuracy="epochs")
    t = result["test"]
    summary = (f"test accuracy {t['accuracy']:.4f}, macro-F1 {t['macro_f1']:.4f}" if labels
               else f"test loss {t['loss']:.4f}, perplexity {t['perplexity']:.2f}")
    print(f"{args.method}: {result['trainable_params']:,} trainable parameters "
          f"({100 * result['trainable_share']:.2f}%), best epoch {result['best_epoch']}, {summary}")
    print(f"saved {saved}, {out / 'metrics.json'}" + (f", {figure}" if figure else ""))


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
