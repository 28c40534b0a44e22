"""The four tuning methods as one call: ``apply_method(model, "lora", ...)``, on lora_kernels'
tuning layer (``impl="lora_kernels"``) or, for comparison, on PEFT (``impl="peft"``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..integrations.model_families import TASK_HEADS

METHODS = ("full", "prompt", "prefix", "lora")
HEAD_NAMES = TASK_HEADS["SEQ_CLS"]


@dataclass
class MethodConfig:
    """Main hyperparameters of each method (the CLI exposes them as flags)."""

    num_virtual_tokens: int = 16
    prefix_projection: bool = False
    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.1
    target_modules: list[str] | str = "all-linear"
    modules_to_save: list[str] = field(default_factory=list)


def task_head(model: torch.nn.Module) -> list[str]:
    """Names of a classification model's new head (``classifier`` for BERT, ``score`` for GPT-2
    and LLaMA), which every method trains; empty for a language model."""
    return [n for n in HEAD_NAMES if isinstance(getattr(model, n, None), torch.nn.Module)]


def apply_method(
    model: torch.nn.Module, method: str, cfg: MethodConfig | None = None, *,
    task: str = "classification", impl: str = "lora_kernels",
) -> torch.nn.Module:
    """Return ``model`` prepared for ``method`` (one of :data:`METHODS`): only the method's
    parameters (and a classification head) require grad afterwards."""
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if impl not in ("lora_kernels", "peft"):
        raise ValueError(f"impl: expected 'lora_kernels' or 'peft', got {impl!r}")
    cfg = cfg or MethodConfig()
    save = list(dict.fromkeys([*cfg.modules_to_save, *(task_head(model) if task == "classification" else [])]))
    if impl == "peft":
        return _apply_peft(model, method, cfg, task, save)
    import lora_kernels as lk

    task_type = "SEQ_CLS" if task == "classification" else "CAUSAL_LM"
    save = save or None
    if method == "full":
        config = lk.FullFineTuningConfig(task_type=task_type)
    elif method == "prompt":
        config = lk.PromptTuningConfig(task_type=task_type, num_virtual_tokens=cfg.num_virtual_tokens,
                                       modules_to_save=save)
    elif method == "prefix":
        config = lk.PrefixTuningConfig(
            task_type=task_type, num_virtual_tokens=cfg.num_virtual_tokens,
            prefix_projection=cfg.prefix_projection, modules_to_save=save,
        )
    else:
        config = lk.LoraConfig(
            task_type=task_type, r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=cfg.target_modules, modules_to_save=save,
        )
    return lk.tune(model, config)


def _apply_peft(model, method, cfg, task, save):
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    import peft

    task_type = "SEQ_CLS" if task == "classification" else "CAUSAL_LM"
    if method == "prompt":
        config = peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=cfg.num_virtual_tokens)
    elif method == "prefix":
        config = peft.PrefixTuningConfig(
            task_type=task_type, num_virtual_tokens=cfg.num_virtual_tokens,
            prefix_projection=cfg.prefix_projection,
        )
    else:
        config = peft.LoraConfig(
            task_type=task_type, r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=cfg.target_modules, modules_to_save=save or None,
        )
    return peft.get_peft_model(model, config)
