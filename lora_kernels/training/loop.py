"""The training procedure shared by ``make demo`` and ``lora-kernels finetune``: AdamW with a
linear warm-up and decay, cross-entropy, an evaluation on the validation split after every
epoch, the best epoch's trainable weights restored at the end, and the test split scored once
(accuracy and macro-F1 for classification; loss and perplexity for a causal LM). It records the
training loss of every step, the median step time and the peak memory of the first epoch.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..tuning.model import count_parameters
from .checkpoint import Checkpointer
from .data import TokenizedSplit
from .memory import PeakMemory
from .metrics import accuracy, macro_f1


@dataclass
class TrainConfig:
    """Hyperparameters of one run. ``task`` is "classification" or "causal-lm"."""

    epochs: int = 3
    lr: float = 1e-3
    batch_size: int = 32
    eval_batch_size: int = 128
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_grad_norm: float | None = 1.0
    task: str = "classification"
    seed: int = 0
    device: str = "cpu"
    progress: bool = True


def _loss_and_logits(model, batch, task):
    if task == "classification":
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits.float(), batch["labels"]), logits
    out = model(**batch)  # the model shifts the labels; prompt tuning pads them with -100
    return out.loss, None


@torch.no_grad()
def evaluate(model, split: TokenizedSplit, cfg: TrainConfig, pad_id: int) -> dict[str, float]:
    """Mean loss over ``split`` and, for classification, accuracy and macro-F1; for a causal LM
    the token-weighted loss and its perplexity."""
    model.eval()
    causal = cfg.task != "classification"
    total, weight, preds, gold = 0.0, 0, [], []
    for batch in split.batches(cfg.eval_batch_size, pad_id, causal=causal):
        batch = {k: v.to(cfg.device) for k, v in batch.items()}
        loss, logits = _loss_and_logits(model, batch, cfg.task)
        n = int((batch["labels"][:, 1:] != -100).sum()) if causal else len(batch["labels"])
        total += float(loss) * n
        weight += n
        if not causal:
            preds += logits.argmax(-1).tolist()
            gold += batch["labels"].tolist()
    out = {"loss": total / max(weight, 1)}
    if causal:
        out["perplexity"] = math.exp(min(out["loss"], 50.0))
    else:
        out["accuracy"] = accuracy(preds, gold)
        out["macro_f1"] = macro_f1(preds, gold)
    return out


def _is_better(new: dict, best: dict | None, task: str) -> bool:
    if best is None:
        return True
    if task == "classification":
        return (new["accuracy"], -new["loss"]) > (best["accuracy"], -best["loss"])
    return new["loss"] < best["loss"]


def fit(
    model: torch.nn.Module,
    train: TokenizedSplit,
    val: TokenizedSplit,
    test: TokenizedSplit,
    cfg: TrainConfig,
    pad_id: int,
    desc: str = "train",
    *,
    checkpointer: Checkpointer | None = None,
    resume: bool = False,
) -> dict:
    """Train ``model``'s parameters that require grad; return the metrics and curves.

    With a ``checkpointer`` a checkpoint is saved after every epoch; with ``resume`` training
    continues from its latest one (same data and configuration: the result equals that of an
    uninterrupted run).

    Returns a dict: ``trainable_params``, ``total_params``, ``step_time_ms`` (median),
    ``peak_memory_bytes`` (first epoch's training steps, above what was live before),
    ``best_epoch`` (1-based), ``val`` and ``test`` metrics at the best epoch, ``history``
    (``train_loss`` per step, ``epoch_train_loss``, ``val`` per epoch), ``train_seconds``.
    """
    if len(train) == 0 or len(val) == 0 or len(test) == 0:
        raise ValueError(f"fit: every split needs examples, got {len(train)}/{len(val)}/{len(test)}")
    torch.manual_seed(cfg.seed)
    model.to(cfg.device)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("fit: the model has no trainable parameters")
    trainable, total = count_parameters(model)
    decay = [p for n, p in named if p.dim() >= 2]
    no_decay = [p for n, p in named if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
    )
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = max(1, int(cfg.warmup_ratio * total_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (total_steps - s) / max(1, total_steps - warmup)))
    )
    causal = cfg.task != "classification"
    record = {"history": {"train_loss": [], "epoch_train_loss": [], "val": []}, "step_times": [],
              "best": None, "best_epoch": 0, "peak": None, "seconds": 0.0}
    best_state, first_epoch = None, 0
    if resume:
        if checkpointer is None:
            raise ValueError("fit: resume=True needs a checkpointer")
        state = checkpointer.restore(named, opt, sched)
        record, first_epoch = state["record"], state["epoch"]
        best_state = checkpointer.weights(record["best_epoch"])
    history, step_times = record["history"], record["step_times"]
    best, best_epoch, peak = record["best"], record["best_epoch"], record["peak"]
    t_start = time.perf_counter() - record["seconds"]
    for epoch in range(first_epoch, cfg.epochs):
        model.train()
        bar = tqdm(
            train.batches(cfg.batch_size, pad_id, shuffle=True, seed=cfg.seed + epoch, causal=causal),
            total=steps_per_epoch, desc=f"{desc} epoch {epoch + 1}/{cfg.epochs}",
            disable=not cfg.progress, leave=False, dynamic_ncols=True,
        )
        epoch_losses = []
        meter = PeakMemory(cfg.device) if epoch == 0 else None
        if meter:
            meter.__enter__()
        for batch in bar:
            batch = {k: v.to(cfg.device) for k, v in batch.items()}
            t0 = time.perf_counter()
            loss, _ = _loss_and_logits(model, batch, cfg.task)
            loss.backward()
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_([p for _, p in named], cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if cfg.device.startswith("cuda"):
                torch.cuda.synchronize()
            step_times.append((time.perf_counter() - t0) * 1e3)
            epoch_losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{epoch_losses[-1]:.3f}")
        if meter:
            meter.__exit__(None, None, None)
            peak = meter.peak_bytes
        history["train_loss"] += epoch_losses
        history["epoch_train_loss"].append(sum(epoch_losses) / len(epoch_losses))
        metrics = evaluate(model, val, cfg, pad_id)
        history["val"].append(metrics)
        if _is_better(metrics, best, cfg.task):
            best, best_epoch = metrics, epoch + 1
            best_state = {n: p.detach().to("cpu", copy=True) for n, p in named}
        if checkpointer is not None:
            record.update(best=best, best_epoch=best_epoch, peak=peak,
                          seconds=time.perf_counter() - t_start)
            checkpointer.save(epoch + 1, named, opt, sched, record)
    with torch.no_grad():
        for n, p in named:
            p.copy_(best_state[n])
    test_metrics = evaluate(model, test, cfg, pad_id)
    timed = step_times[2:] if len(step_times) > 4 else step_times
    return {
        "trainable_params": trainable,
        "total_params": total,
        "trainable_share": trainable / total,
        "step_time_ms": statistics.median(timed),
        "peak_memory_bytes": peak,
        "best_epoch": best_epoch,
        "val": best,
        "test": test_metrics,
        "history": history,
        "train_seconds": time.perf_counter() - t_start,
        "config": asdict(cfg),
    }
