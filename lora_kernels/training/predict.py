"""``lora-kernels predict``: label the texts of a ``.jsonl``/``.csv`` file with a classification
run of ``lora-kernels finetune`` (its ``--out`` folder: ``run.json`` and ``adapter/`` or
``model/``). Writes one JSON line per record (text, predicted label, its probability, and the
gold label when the file has one) and, when every record has a label, prints accuracy and
macro-F1: the same figures ``finetune`` reports for its test split.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .arguments import (
    UsageError,
    check_backend,
    check_device,
    check_model_folder,
    check_writable_target,
    positive_int,
)
from .data import load_records, tokenize

BACKEND_CHOICES = ("auto", "torch", "triton", "cuda")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="the --out folder of a classification run of lora-kernels finetune")
    p.add_argument("data", help="texts to label: a .jsonl or .csv file")
    p.add_argument("--text-field", default=None, help="field holding the text (default: the run's)")
    p.add_argument("--label-field", default=None,
                   help="gold label field, scored when every record has it (default: the run's)")
    p.add_argument("--out", default=None, help="predictions file (default: RUN/predictions.jsonl)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing predictions file")
    p.add_argument("--model", default=None,
                   help="base model folder (default: the one the run was trained from)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="texts per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                   help="kernels for the fused ops")


def read_run(folder: Path) -> dict:
    """``run.json`` of a finished classification run in ``folder``."""
    if not folder.is_dir():
        raise UsageError(f"RUN {folder}: no such folder")
    try:
        run = json.loads((folder / "run.json").read_text())
        arguments = run["arguments"]
    except (OSError, ValueError, KeyError):
        raise UsageError(f"RUN {folder}: not a run of lora-kernels finetune (no run.json)") from None
    if arguments.get("task") != "classification":
        raise UsageError(f"RUN {folder} trained a {arguments.get('task')} model; predict labels "
                         "texts with a classification run")
    saved = folder / ("model" if arguments["method"] == "full" else "adapter")
    if not saved.is_dir():
        raise UsageError(f"RUN {folder} has no {saved.name}/ (the run has not finished; "
                         "lora-kernels finetune --resume completes it)")
    return run


def run(args: argparse.Namespace) -> int:
    """The ``predict`` sub-command; returns the exit status (bad input raises UsageError /
    DataError, which the CLI prints with exit status 2)."""
    folder = Path(args.run)
    saved_run = read_run(folder)
    arguments, labels = saved_run["arguments"], saved_run["labels"]
    out = Path(args.out) if args.out else folder / "predictions.jsonl"
    check_writable_target(out, "--out", folder=False)
    if out.exists() and not args.overwrite:
        raise UsageError(f"--out {out} exists: pass --overwrite to replace it, or another --out")
    device = check_device(args.device)
    check_backend(args.backend, device)
    text_field = args.text_field or arguments["text_field"]
    label_field = args.label_field or arguments["label_field"]
    records = load_records(args.data, text_field, label_field, label_optional=True)
    method = arguments["method"]
    base = check_model_folder(folder / "model" if method == "full" else args.model or arguments["model"],
                              "--model" if args.model else "the run's base model")

    import torch

    import lora_kernels

    from .finetune import load_model, load_tokenizer
    from .metrics import accuracy, macro_f1

    lora_kernels.set_backend(args.backend)
    tokenizer = load_tokenizer(base)
    model = load_model(base, labels, tokenizer.pad_token_id)
    if method != "full":
        try:
            model = lora_kernels.load_adapter(model, folder / "adapter")
        except (ValueError, OSError) as e:
            raise UsageError(f"cannot load {folder / 'adapter'} onto {base}: {e}") from e
    model.to(device).eval()
    split = tokenize(tokenizer, records, arguments["max_length"])
    predicted, probability = [], []
    with torch.no_grad():
        for batch in split.batches(args.batch_size, tokenizer.pad_token_id):
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float()
            best = logits.softmax(-1).max(-1)
            predicted += best.indices.tolist()
            probability += best.values.tolist()
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for rec, i, p in zip(records, predicted, probability):
            line = {"text": rec["text"], "prediction": labels[i], "probability": round(p, 6)}
            if "label" in rec:
                line["label"] = rec["label"]
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    print(f"labelled {len(records)} records of {args.data}: {out}")
    if records and "label" in records[0]:
        ids = {name: i for i, name in enumerate(labels)}
        gold = [ids.get(r["label"], -1) for r in records]
        print(f"accuracy {accuracy(predicted, gold):.4f}, macro-F1 {macro_f1(predicted, gold):.4f}")
    return 0
