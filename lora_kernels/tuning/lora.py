"""LoRA on a transformers model: each target module swapped for a ``LoRALinear`` in place (the
same weight/bias Parameter objects, so the base model's state-dict keys stay)."""

from __future__ import annotations

from torch import nn

from ..nn.lora_linear import LoRALinear
from .changes import apply_modules_to_save, freeze
from .config import LoraConfig
from .targets import lora_target_names, modules_to_save_names


def tune_lora(tuned, config: LoraConfig) -> None:
    """Wrap the targets, freeze everything else; biases per ``config.bias``; modules_to_save
    (with the task head) as trainable copies."""
    model = tuned.base_model
    names = lora_target_names(model, config)
    keep = modules_to_save_names(model, config)
    if any(n == k or n.startswith(k + ".") for n in names for k in keep):
        raise ValueError("LoraConfig: a module is both a LoRA target and in modules_to_save")
    freeze(tuned)
    layers = _wrap_targets(tuned, names, config)
    for layer in layers.values():
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    if config.bias == "all":
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.requires_grad_(True)
    elif config.bias == "lora_only":
        for layer in layers.values():
            if layer.bias is not None:
                layer.bias.requires_grad_(True)
    apply_modules_to_save(tuned, keep)


def _wrap_targets(tuned, names: list[str], config: LoraConfig) -> dict[str, LoRALinear]:
    """Swap each named module for a LoRALinear (the swap is undone on unload)."""
    model, layers = tuned.base_model, {}
    for name in names:
        base = model.get_submodule(name)
        layer = LoRALinear.from_linear(
            base, r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            use_rslora=config.use_rslora, init_lora_weights=config.init_lora_weights, freeze_base=False,
        )
        model.set_submodule(name, layer)
        tuned.on_unload(lambda name=name, base=base: model.set_submodule(name, base), swap=True)
        layers[name] = layer
    return layers


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear of ``model`` by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
