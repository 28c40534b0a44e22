"""What ran a job: CPU model and cores or GPU name, library versions; paths as result files
should record them."""

from __future__ import annotations

import os
import platform
import sysconfig
from pathlib import Path

import torch


def machine_info(device: str | torch.device = "cpu") -> dict[str, str]:
    """CPU model, cores and torch threads (or the GPU's name), and the versions that matter."""
    device = torch.device(device)
    if device.type == "cuda":
        hw = torch.cuda.get_device_name(device)
    else:
        hw = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                hw = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
        except (OSError, StopIteration):
            pass
        hw = f"{hw}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    info = {"device": hw, "torch": torch.__version__, "python": platform.python_version()}
    for name in ("triton", "transformers"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            pass
    return info


def portable_path(path: str | Path) -> str:
    """``path`` as a result file should record it: relative to site-packages, the working
    folder or the repository when inside one of them, else only its last two parts (a result
    file must not carry the layout of the machine it was written on)."""
    path = Path(path)
    if not path.is_absolute():
        return path.as_posix()
    resolved = path.resolve()
    # site-packages first: a virtualenv often lives inside the working folder or the repository
    bases = [*(Path(p) for p in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}),
             Path.cwd(), Path(__file__).resolve().parents[2]]
    for base in bases:
        try:
            return resolved.relative_to(base.resolve()).as_posix()
        except ValueError:
            continue
    return Path(*resolved.parts[-2:]).as_posix()
