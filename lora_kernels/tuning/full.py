"""Full fine-tuning: every parameter trains except those under ``frozen_modules``; the modules
in ``modules_to_save`` train even under a frozen parent. Nothing is added to the model, so its
"adapter" is the model itself (saved as a transformers model folder, see ``io``)."""

from __future__ import annotations

from .changes import enable_checkpointing, record_requires_grad
from .config import FullFineTuningConfig
from .targets import check_names_exist, matches


def tune_full(tuned, config: FullFineTuningConfig) -> None:
    model = tuned.base_model
    frozen = config.frozen_modules or []
    keep = config.modules_to_save or []
    check_names_exist(model, [*frozen, *keep], "FullFineTuningConfig")
    record_requires_grad(tuned)
    model.requires_grad_(True)
    for name, module in model.named_modules():
        if name and matches(name, frozen):
            module.requires_grad_(False)
    for name, module in model.named_modules():
        if name and matches(name, keep):
            module.requires_grad_(True)
    if config.gradient_checkpointing:
        enable_checkpointing(tuned)
