"""Checking the command line of ``lora-kernels finetune`` / ``predict`` before anything is loaded:
argparse types for numbers with a range, and the checks that need the machine or the file
system (device, backend, model folder, output folder). Every failure is a :class:`UsageError`
with a one-line message; the CLI prints it and exits with status 2.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path


class UsageError(ValueError):
    """An argument that cannot work; the message names it and says what is expected."""


def _number(kind, low: float, *, low_open: bool = False, high: float | None = None,
            high_open: bool = False):
    """An argparse type: ``kind`` (int or float) in the range given, finite."""
    lo = f"> {low:g}" if low_open else f">= {low:g}"
    hi = "" if high is None else (f" and < {high:g}" if high_open else f" and <= {high:g}")
    what = ("an integer " if kind is int else "a number ") + lo + hi

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        ok = math.isfinite(value) and (value > low if low_open else value >= low)
        if high is not None:
            ok = ok and (value < high if high_open else value <= high)
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_int = _number(int, 1)
positive_float = _number(float, 0, low_open=True)
non_negative_float = _number(float, 0)
probability = _number(float, 0, high=1, high_open=True)


def check_device(spec: str) -> str:
    """``auto`` (cuda when a GPU is visible), ``cpu``, ``cuda`` or ``cuda:N``; the device string."""
    import torch

    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device: expected auto, cpu, cuda or cuda:N, got {spec!r}") from None
    if device.type == "cpu":
        return "cpu"
    if device.type != "cuda":
        raise UsageError(f"--device: expected auto, cpu, cuda or cuda:N, got {spec!r}")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {spec}: no CUDA GPU is visible to torch {torch.__version__} "
                         f"(CUDA build: {torch.version.cuda or 'no'}); use --device cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} GPU(s) visible")
    return spec


def check_backend(name: str, device: str) -> None:
    """An explicitly requested backend must be able to run on ``device`` at all."""
    import torch

    from .. import backends

    if name == "auto":
        return
    reasons = backends.available_reasons(name, torch.device(device))
    if reasons:
        raise UsageError(f"--backend {name} cannot run on {device}: {'; '.join(reasons)} "
                         "(--backend auto picks one that can)")


def check_model_folder(folder: str | Path, flag: str = "MODEL") -> Path:
    path = Path(folder)
    if not path.is_dir():
        raise UsageError(f"{flag} {path}: no such folder (expected a local model folder with "
                         "config.json, weights and tokenizer files)")
    if not (path / "config.json").is_file():
        raise UsageError(f"{flag} {path} is not a model folder (no config.json)")
    return path


def check_writable_target(path: str | Path, flag: str, *, folder: bool) -> None:
    """``path`` can be created as a folder (``folder``) or a file: it is not the other kind, and
    its nearest existing parent is a writable folder."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        raise UsageError(f"{flag} {path}: is a {'file' if folder else 'folder'}, expected a "
                         f"{'folder' if folder else 'file'}")
    parent = path if path.exists() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: {parent} is a file, so the {'folder' if folder else 'file'}"
                         " cannot be created")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: {parent} is not writable")


def check_output_folder(out: Path, *, overwrite: bool, resume: bool) -> None:
    """A run writes into ``out``: refuse a file, an unwritable place, or a folder that already
    holds something unless ``--overwrite`` (replace) or ``--resume`` (continue) says what to do."""
    if overwrite and resume:
        raise UsageError("--overwrite and --resume contradict each other: pass one of them")
    check_writable_target(out, "--out", folder=True)
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if resume and not entries:
        raise UsageError(f"--resume: {out} holds no run to continue")
    if entries and not (overwrite or resume):
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise UsageError(f"--out {out} is not empty ({shown}): pass --overwrite to replace its run, "
                         "--resume to continue it, or another --out")
