"""Checkpoints of a training run, one per epoch, for ``lora-kernels finetune --resume``.

A checkpoint is a folder ``<root>/epoch-<n>`` holding the trainable parameters after epoch
``n`` (``trainable.safetensors``, by parameter name: the method's weights and the classification
head, never the frozen base) and ``state.pt`` (optimizer, scheduler, random number generators,
and the loop's record: history, best epoch, step times). It is written to a temporary folder and
renamed, so a run killed while saving leaves the previous checkpoint intact. Only the latest and
the best epoch's checkpoints are kept: the best epoch's weights are what the run ends with.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_NAME = re.compile(r"epoch-(\d+)")
WEIGHTS, STATE = "trainable.safetensors", "state.pt"


def checkpoints(root: str | Path) -> dict[int, Path]:
    """Complete checkpoints under ``root`` by epoch (1-based)."""
    root = Path(root)
    found = {}
    if root.is_dir():
        for sub in root.iterdir():
            m = _NAME.fullmatch(sub.name)
            if m and (sub / WEIGHTS).is_file() and (sub / STATE).is_file():
                found[int(m.group(1))] = sub
    return dict(sorted(found.items()))


class Checkpointer:
    """Saves and restores one run's checkpoints under ``root``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def save(self, epoch: int, named: list[tuple[str, torch.nn.Parameter]], optimizer, scheduler,
             record: dict) -> Path:
        """Write epoch ``epoch``'s checkpoint; delete those neither latest nor best."""
        final = self.root / f"epoch-{epoch}"
        tmp = self.root / f"epoch-{epoch}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({n: p.detach().to("cpu").contiguous() for n, p in named}, tmp / WEIGHTS)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save({"epoch": epoch, "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "rng": rng, "record": record}, tmp / STATE)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        keep = {epoch, record.get("best_epoch")}
        for old_epoch, folder in checkpoints(self.root).items():
            if old_epoch not in keep:
                shutil.rmtree(folder, ignore_errors=True)
        return final

    def latest(self) -> int | None:
        found = checkpoints(self.root)
        return max(found) if found else None

    def weights(self, epoch: int) -> dict[str, torch.Tensor]:
        """The trainable parameters saved after ``epoch``."""
        return load_file(self.root / f"epoch-{epoch}" / WEIGHTS)

    def restore(self, named: list[tuple[str, torch.nn.Parameter]], optimizer, scheduler) -> dict:
        """Load the latest checkpoint into the parameters, optimizer, scheduler and random
        number generators; return its state (``epoch``, ``record``)."""
        epoch = self.latest()
        if epoch is None:
            raise FileNotFoundError(f"{self.root}: no checkpoint to resume from")
        weights = self.weights(epoch)
        names = {n for n, _ in named}
        if set(weights) != names:
            missing, extra = sorted(names - set(weights)), sorted(set(weights) - names)
            raise ValueError(f"{self.root}/epoch-{epoch} does not fit this model: missing "
                             f"{missing[:3]}, unexpected {extra[:3]}")
        with torch.no_grad():
            for n, p in named:
                p.copy_(weights[n])
        state = torch.load(self.root / f"epoch-{epoch}" / STATE, map_location="cpu",
                           weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        return state
