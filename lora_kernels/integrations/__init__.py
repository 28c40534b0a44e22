"""Bridges to other libraries: ``transformers`` (attention registration, model families) and
``peft`` (putting an existing PEFT model on the fused ops). Each submodule is imported on first
attribute access (``lora_kernels.integrations.peft.accelerate``); peft itself is imported only
inside the functions that need it."""

from __future__ import annotations

import importlib

_SUBMODULES = ("transformers", "peft", "model_families")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
