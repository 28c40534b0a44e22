"""The entry points: ``tune(model, config)`` applies a method, ``load_adapter(model, dir)`` applies
a saved one. Everything is validated before the model is touched, and a failure half-way puts
the model back exactly as it was."""

from __future__ import annotations

import copy

from torch import nn

from ..integrations.model_families import infer_task_type
from . import io
from .changes import enable_attention
from .config import (
    FullFineTuningConfig,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    TuningConfig,
)
from .full import tune_full
from .lora import tune_lora
from .model import TunedModel
from .prefix import tune_prefix
from .prompt import tune_prompt

_METHODS = {
    LoraConfig: tune_lora,
    FullFineTuningConfig: tune_full,
    PrefixTuningConfig: tune_prefix,
    PromptTuningConfig: tune_prompt,
}


def tune(model: nn.Module, config: TuningConfig, *, fused_attention: bool = True) -> TunedModel:
    """Apply ``config``'s method to ``model`` (a transformers PreTrainedModel) in place and
    return the ``TunedModel`` around it. ``fused_attention``: run attention through
    ``prefix_attention`` (always on for prefix tuning; a model whose attention cannot be
    reached then only gets a warning for the other methods).

    ``config.task_type`` None is inferred from the model class (``...ForCausalLM`` ->
    "CAUSAL_LM", ``...ForSequenceClassification`` -> "SEQ_CLS", ...) and written with the
    adapter, so PEFT loads it as the matching ``PeftModelFor...`` class. On any error the model
    is left exactly as it was.

    Equivalent PEFT::

        peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    """
    if isinstance(model, TunedModel):
        raise TypeError("tune: the model is already a TunedModel; call unload() first")
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"tune: expected a transformers PreTrainedModel, got {type(model).__name__}")
    method = _METHODS.get(type(config))
    if method is None:
        raise TypeError(f"tune: expected one of {[c.__name__ for c in _METHODS]}, got {type(config).__name__}")
    config = copy.copy(config)
    if config.task_type is None:
        config.task_type = infer_task_type(model)
    tuned = TunedModel(model, config)
    try:
        method(tuned, config)
        if fused_attention and not isinstance(config, PrefixTuningConfig):
            enable_attention(tuned, required=False)
    except BaseException:
        tuned.unload()
        raise
    return tuned


def load_adapter(model: nn.Module, directory, *, is_trainable: bool = False, allow_bin: bool = False,
                 fused_attention: bool = True) -> TunedModel:
    """Load an adapter saved here or by PEFT onto ``model`` (a transformers model); returns
    the ``TunedModel``. A transformers model folder (``config.json`` + ``model.safetensors``,
    as full fine-tuning saves) loads as full fine-tuning. ``is_trainable=False`` puts it in eval mode with its parameters frozen.
    An adapter that does not fit the model raises ``ValueError`` with the model unchanged.

    Equivalent PEFT::

        peft.PeftModel.from_pretrained(model, directory)
    """
    if isinstance(model, TunedModel):
        raise TypeError("load_adapter: the model is already tuned; call unload() first")
    config, tensors = io.read_adapter(directory, allow_bin=allow_bin)
    config, restore = io.config_for_loading(config, model, is_trainable)
    io.check_fits(model, config, tensors)
    try:
        tuned = tune(model, config, fused_attention=fused_attention)
    except ValueError as err:
        raise ValueError(f"load_adapter: the {config.peft_type} adapter in {directory} does not fit "
                         f"{type(model).__name__}: {err}") from None
    try:
        io.fill_adapter(tuned, tensors)
    except BaseException:
        tuned.unload()
        raise
    for field, value in restore.items():
        setattr(tuned.config_tuning, field, value)
    if not is_trainable:
        for p in tuned.parameters():
            p.requires_grad_(False)
        tuned.eval()
    return tuned
