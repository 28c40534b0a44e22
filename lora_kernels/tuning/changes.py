"""Changes to a model that several methods make, each recorded with ``tuned.on_unload`` so that
``unload()`` (or a failure half-way through ``tune``) undoes it."""

from __future__ import annotations

import copy
import warnings

from torch import nn

from ..integrations import transformers as hf_attention


def freeze(tuned) -> None:
    """Every parameter of the base model frozen (the flags as they were come back on unload)."""
    model = tuned.base_model
    record_requires_grad(tuned)
    model.requires_grad_(False)


def record_requires_grad(tuned) -> None:
    """Remember every parameter's ``requires_grad`` flag, to put back on unload."""
    flags = [(p, p.requires_grad) for p in tuned.base_model.parameters()]

    def restore():
        for p, flag in flags:
            p.requires_grad_(flag)

    tuned.on_unload(restore)


def apply_modules_to_save(tuned, names: list[str]) -> None:
    """Replace each named module by a trainable copy; the original is kept (not in the module
    tree) for ``unload``, and ``merge_and_unload`` keeps the trained copy."""
    model = tuned.base_model
    for name in names:
        original = model.get_submodule(name)
        trained = copy.deepcopy(original)
        for p in trained.parameters():
            p.requires_grad_(True)
        model.set_submodule(name, trained)
        tuned.modules_to_save[name] = original

        def restore(name=name, original=original):
            # the original sits outside the module tree: follow the copy if it was moved
            current = next(iter(model.get_submodule(name).parameters()), None)
            if current is not None:
                original.to(current.device)
            model.set_submodule(name, original)
            tuned.modules_to_save.pop(name, None)

        tuned.on_unload(restore, swap=True)


def enable_attention(tuned, required: bool) -> None:
    """Run the model's attention through ``prefix_attention``. A model whose attention cannot be
    reached raises (``required``, prefix tuning) or gets a warning."""
    model = tuned.base_model
    if hf_attention.is_fused_attention_enabled(model):
        return
    reason = hf_attention.unsupported_reason(model)
    if reason is not None:
        if required:
            raise ValueError(f"prefix tuning needs our attention function: {reason}")
        warnings.warn(f"lora_kernels: fused attention not enabled ({reason})", stacklevel=3)
        return
    hf_attention.enable_fused_attention(model)
    tuned.on_unload(lambda: hf_attention.disable_fused_attention(model))


def enable_checkpointing(tuned) -> None:
    """transformers' activation checkpointing (``activation_checkpointing_enable`` since 5.23,
    ``gradient_checkpointing_enable`` before), non-reentrant."""
    model: nn.Module = tuned.base_model
    if hasattr(model, "activation_checkpointing_enable"):
        was = bool(model.is_activation_checkpointing)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        disable = model.activation_checkpointing_disable
    else:
        was = bool(getattr(model, "is_gradient_checkpointing", False))
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        disable = model.gradient_checkpointing_disable
    if not was:
        tuned.on_unload(disable)
