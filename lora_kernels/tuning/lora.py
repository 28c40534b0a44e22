"""LoRA on a transformers model: find the target modules, check everything, then swap each for
a ``LoRALinear`` in place (same weight/bias Parameter objects, so base state-dict keys stay)."""

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
from ..nn.lora_linear import LoRALinear, _is_conv1d
from .config import LoraConfig


def is_linear_like(module: nn.Module) -> bool:
    return (isinstance(module, nn.Linear) or _is_conv1d(module)) and not isinstance(module, LoRALinear)


def _matches(name: str, patterns: list[str] | str) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == t or name.endswith("." + t) for t in patterns)


def output_head_names(model: nn.Module, task_type: str | None = None) -> set[str]:
    """Names of the modules "all-linear" never targets: the output head
    (``get_output_embeddings()``, ``lm_head``), every task head, and for SEQ_CLS the pooler
    feeding the classifier (with everything inside them)."""
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    tops = {"lm_head", *(h for heads in TASK_HEADS.values() for h in heads)}
    pooler = classifier_pooler(model) if task_type == "SEQ_CLS" else None
    excluded = set()
    for name, module in model.named_modules():
        if module is out or name.split(".")[-1] in tops or name == pooler:
            excluded.add(name)
    return {n for n, _ in model.named_modules() if n in excluded or any(n.startswith(e + ".") for e in excluded)}


def resolve_target_names(model: nn.Module, config: LoraConfig) -> list[str]:
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
        heads = output_head_names(model, config.task_type)
        chosen = [n for n in linear_names if n not in heads]
    elif isinstance(targets, str):
        chosen = [n for n in modules if n and _matches(n, targets)]
        if not chosen:
            raise ValueError(f"LoraConfig.target_modules: regex {targets!r} matches no module; "
                             f"linear layers: {candidates}")
    else:
        targets = list(targets)
        unknown = [t for t in targets if not any(_matches(n, [t]) for n in modules if n)]
        if unknown:
            raise ValueError(f"LoraConfig.target_modules: {unknown} match no module of "
                             f"{type(model).__name__}; linear layers: {candidates}")
        chosen = [n for n in modules if n and _matches(n, targets)]
    if config.exclude_modules:
        chosen = [n for n in chosen if not _matches(n, config.exclude_modules)]
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


def wrap_targets(model: nn.Module, names: list[str], config: LoraConfig, undo: list) -> dict[str, LoRALinear]:
    """Swap each named module for a LoRALinear; push an undo step per swap."""
    layers = {}
    for name in names:
        base = model.get_submodule(name)
        layer = LoRALinear.from_linear(
            base, r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            use_rslora=config.use_rslora, init_lora_weights=config.init_lora_weights, freeze_base=False,
        )
        model.set_submodule(name, layer)
        undo.append(lambda name=name, base=base: model.set_submodule(name, base))
        layers[name] = layer
    return layers


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
