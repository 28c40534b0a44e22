"""What ran a job: CPU model and cores or GPU name, library versions."""

from __future__ import annotations

import os
import platform

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
