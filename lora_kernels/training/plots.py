"""The training figure shared by ``make demo`` and ``lora-kernels finetune``: loss curves per run
(training loss as a running mean, validation loss after each epoch) beside an accuracy panel.

Each run is a result of :func:`lora_kernels.training.loop.fit`. matplotlib is optional: without
it no figure is drawn and the functions return None.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path


def running_mean(values: Sequence[float], window: int) -> list[float]:
    """Mean of the last ``window`` values at each position (fewer at the start)."""
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1): i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figure", file=sys.stderr)
        return None
    return plt


def _loss_curves(ax, name: str, res: dict) -> str:
    """Training loss (running mean) and validation loss per epoch of one run; returns its colour."""
    loss = res["history"]["train_loss"]
    val = res["history"]["val"]
    line, = ax.plot(range(1, len(loss) + 1), running_mean(loss, max(1, len(loss) // 40)),
                    label=f"{name} (train)")
    per_epoch = len(loss) / len(val)
    ax.plot([per_epoch * (i + 1) for i in range(len(val))], [v["loss"] for v in val], "o--",
            color=line.get_color(), label=f"{name} (validation)")
    return line.get_color()


def _accuracy_vs_parameters(ax, name: str, res: dict, color: str) -> None:
    ax.scatter(res["trainable_params"], res["test"]["accuracy"], color=color, s=60)
    ax.annotate(name, (res["trainable_params"], res["test"]["accuracy"]),
                textcoords="offset points", xytext=(6, 4))


def _metric_per_epoch(ax, name: str, res: dict, color: str, metric: str) -> None:
    val = res["history"]["val"]
    epochs = range(1, len(val) + 1)
    ax.plot(epochs, [v[metric] for v in val], "o-", color=color, label=f"{name} (validation)")
    ax.scatter([res["best_epoch"]], [res["test"][metric]], marker="*", s=140, color=color,
               label=f"{name} (test, best epoch)", zorder=3)


def plot_runs(runs: dict[str, dict], path: str | Path, *, title: str,
              accuracy: str = "parameters") -> Path | None:
    """Draw ``runs`` (display name -> ``fit`` result) to ``path`` (PNG); return the path.

    Left: loss curves. Right, with ``accuracy="parameters"``: test accuracy against trainable
    parameters (log scale; the demo's comparison of methods); with ``accuracy="epochs"``: the
    validation accuracy after each epoch and the test accuracy at the best epoch (perplexity
    instead for a causal LM, whose results have no accuracy).
    """
    if accuracy not in ("parameters", "epochs"):
        raise ValueError(f"accuracy: expected 'parameters' or 'epochs', got {accuracy!r}")
    plt = _pyplot()
    if plt is None:
        return None
    path = Path(path)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    metric = "accuracy" if all("accuracy" in r["test"] for r in runs.values()) else "perplexity"
    for name, res in runs.items():
        color = _loss_curves(ax1, name, res)
        if accuracy == "parameters" and metric == "accuracy":
            _accuracy_vs_parameters(ax2, name, res, color)
        else:
            _metric_per_epoch(ax2, name, res, color, metric)
    ax1.set(xlabel="training step", ylabel="loss", title="Loss (train: running mean)")
    ax1.legend(fontsize=7)
    if accuracy == "parameters" and metric == "accuracy":
        ax2.set_xscale("log")
        ax2.set(xlabel="trainable parameters (log)", ylabel="test accuracy",
                title="Test accuracy vs trainable parameters")
    else:
        from matplotlib.ticker import MaxNLocator

        ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax2.set(xlabel="epoch", ylabel=metric, title=f"{metric.capitalize()} per epoch")
        ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
