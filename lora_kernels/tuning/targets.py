"""Which modules a config names, in one place: LoRA's target modules, ``modules_to_save`` with
the task head, full fine-tuning's frozen modules, and what "all-linear" leaves out.

A name in a list matches a module whose full name equals it or ends with ``"." + name``
(PEFT's rule); a string is a regular expression matched against the whole name."""

from __future__ import annotations

import re

from torch import nn

from ..integrations.model_families import (
    DEFAULT_LORA_TARGETS,
    TASK_HEADS,
    classifier_pooler,
    layer_index,
    text_config,
)
from ..nn.lora_linear import LoRALinear, is_conv1d
from .config import LoraConfig


def matches(name: str, patterns: list[str] | str) -> bool:
    """Does module name ``name`` match ``patterns`` (a list of names/suffixes, or a regex)?"""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == t or name.endswith("." + t) for t in patterns)


def matching_modules(model: nn.Module, patterns: list[str] | str) -> list[str]:
    """Names of the (non-root) modules of ``model`` that match ``patterns``, in model order."""
    return [n for n, _ in model.named_modules() if n and matches(n, patterns)]


def check_names_exist(model: nn.Module, names: list[str], what: str) -> None:
    """ValueError naming the first of ``names`` that matches no module of ``model``."""
    for target in names:
        if not matching_modules(model, [target]):
            raise ValueError(f"{what}: {target!r} matches no module of {type(model).__name__}; "
                             f"top-level modules: {[n for n, _ in model.named_children()]}")


def is_linear_like(module: nn.Module) -> bool:
    """An ``nn.Linear`` or transformers' ``Conv1D`` not already wrapped by LoRA."""
    return (isinstance(module, nn.Linear) or is_conv1d(module)) and not isinstance(module, LoRALinear)


def all_linear_exclusions(model: nn.Module, task_type: str | None = None) -> set[str]:
    """Names of the modules "all-linear" never targets: the output head
    (``get_output_embeddings()``, ``lm_head``), every task head, and for SEQ_CLS the pooler
    feeding the classifier (with everything inside them)."""
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    tops = {"lm_head", *(h for heads in TASK_HEADS.values() for h in heads)}
    pooler = classifier_pooler(model) if task_type == "SEQ_CLS" else None
    excluded = {n for n, m in model.named_modules() if m is out or n.split(".")[-1] in tops or n == pooler}
    return {n for n, _ in model.named_modules() if n in excluded or any(n.startswith(e + ".") for e in excluded)}


def lora_target_names(model: nn.Module, config: LoraConfig) -> list[str]:
    """The module names LoRA will wrap. Raises ValueError (listing the candidates) for a
    target that matches nothing, a target that is not a Linear/Conv1D, or an empty result."""
    modules = dict(model.named_modules())
    linear_names = [n for n, m in modules.items() if n and is_linear_like(m)]
    if any(isinstance(m, LoRALinear) for m in modules.values()):
        raise ValueError("tune(LoraConfig): the model already holds LoRALinear layers (already tuned?); "
                         "unload the other adapter first")
    candidates = sorted({n.split(".")[-1] for n in linear_names})
    targets = config.target_modules
    if targets is None:
        model_type = getattr(text_config(model), "model_type", None)
        if model_type not in DEFAULT_LORA_TARGETS:
            raise ValueError(f"LoraConfig.target_modules is None and model type {model_type!r} has no default; "
                             f"pass target_modules (candidates: {candidates})")
        targets = DEFAULT_LORA_TARGETS[model_type]
    if targets == "all-linear" or targets == ["all-linear"]:
        excluded = all_linear_exclusions(model, config.task_type)
        chosen = [n for n in linear_names if n not in excluded]
    elif isinstance(targets, str):
        chosen = matching_modules(model, targets)
        if not chosen:
            raise ValueError(f"LoraConfig.target_modules: regex {targets!r} matches no module; "
                             f"linear layers: {candidates}")
    else:
        targets = list(targets)
        unknown = [t for t in targets if not matching_modules(model, [t])]
        if unknown:
            raise ValueError(f"LoraConfig.target_modules: {unknown} match no module of "
                             f"{type(model).__name__}; linear layers: {candidates}")
        chosen = matching_modules(model, targets)
    if config.exclude_modules:
        chosen = [n for n in chosen if not matches(n, config.exclude_modules)]
    if config.layers_to_transform is not None:
        wanted = set(config.layers_to_transform)
        chosen = [n for n in chosen if layer_index(n, config.layers_pattern) in wanted]
    bad = [f"{n} ({type(modules[n]).__name__})" for n in chosen if not is_linear_like(modules[n])]
    if bad:
        raise ValueError(f"LoraConfig.target_modules: LoRA supports nn.Linear and Conv1D, not {bad}; "
                         f"linear layers: {candidates}")
    if not chosen:
        raise ValueError(f"LoraConfig: no module left to adapt (targets {targets!r}, "
                         f"layers_to_transform {config.layers_to_transform}); linear layers: {candidates}")
    return chosen


def modules_to_save_names(model: nn.Module, config) -> list[str]:
    """The modules trained in full: ``config.modules_to_save`` plus the task head (PEFT's names
    for the task type, and for SEQ_CLS the pooler feeding the classifier unless
    ``train_pooler=False``). Raises ValueError for a name that matches nothing."""
    names = list(getattr(config, "modules_to_save", None) or [])
    check_names_exist(model, names, "modules_to_save")
    heads = list(TASK_HEADS.get(config.task_type, ()))
    pooler = classifier_pooler(model) if config.task_type == "SEQ_CLS" else None
    if pooler is not None and getattr(config, "train_pooler", False):
        heads.append(pooler)
    names += [h for h in heads if h not in names and matching_modules(model, [h])]
    return sorted({n for target in names for n in matching_modules(model, [target])})
