"""Run an existing PEFT model on lora_kernels' fused ops, in place and undoably.

    from lora_kernels.integrations.peft import accelerate
    handle = accelerate(peft_model)      # LoRA layers now call lora_linear
    ...train or generate as before...
    handle.restore()                     # or: with accelerate(peft_model): ...

Nothing about the model changes except which code its LoRA layers run: no parameter is created,
moved or renamed, so ``state_dict()`` keys and ``save_pretrained`` files stay PEFT's own. Each
supported ``peft.tuners.lora.Linear`` (over ``nn.Linear`` or GPT-2's ``Conv1D``, one active plain
LoRA adapter, any dropout) gets an instance-level ``forward`` that calls :func:`lora_kernels.lora_linear`
with the layer's own Parameters; deleting that attribute gives PEFT's forward back. Per call, a
layer that is merged, has adapters disabled, or gets ``adapter_names`` (mixed batches) takes
PEFT's path. Layers PEFT runs differently (DoRA and other LoRA variants, several active adapters,
``lora_bias``, quantized or other base layers) stay on PEFT's path and are reported in one log
warning.

Prefix tuning: a PEFT prefix-tuning model (decoder or encoder; GPT-2, LLaMA, BERT, ...) runs
its forward on the tuning layer's attention integration: PEFT's prefix (same parameters) goes to
``prefix_attention`` through per-layer attributes instead of the KV cache, which also makes it
work under gradient checkpointing; ``generate`` and calls with a cache stay on PEFT's path.

peft is imported only inside these functions, never when ``lora_kernels`` is imported.
"""

from __future__ import annotations

import inspect
import logging
import types
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from ..ops import lora_linear

logger = logging.getLogger(__name__)
_HANDLE_ATTR = "_lora_kernels_acceleration"


@dataclass
class Acceleration:
    """What :func:`accelerate` changed: ``lora_layers`` (module names now on ``lora_linear``),
    ``prefix`` (True when prefix tuning runs on ``prefix_attention``), ``skipped``
    ({module name: reason}). ``restore()`` undoes it; usable as a context manager."""

    model: nn.Module
    lora_layers: list[str] = field(default_factory=list)
    prefix: bool = False
    skipped: dict[str, str] = field(default_factory=dict)
    _undo: list = field(default_factory=list, repr=False)

    def restore(self) -> None:
        """Put every layer back on PEFT's own forward (idempotent)."""
        while self._undo:
            self._undo.pop()()
        if getattr(self.model, _HANDLE_ATTR, None) is self:
            delattr(self.model, _HANDLE_ATTR)

    def __enter__(self) -> Acceleration:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def _dropout_p(module: nn.Module) -> float | None:
    if isinstance(module, nn.Identity):
        return 0.0
    if type(module) is nn.Dropout:
        return float(module.p)
    return None


def _static_reason(layer: nn.Module) -> str | None:
    """Why this PEFT LoRA layer cannot run on lora_linear at all (None: it can)."""
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    if type(layer) is not PeftLoraLinear:
        return f"layer type {type(layer).__module__}.{type(layer).__name__}"
    base = layer.get_base_layer()
    is_conv1d = type(base).__name__ == "Conv1D" and hasattr(base, "nf")
    if type(base) is not nn.Linear and not is_conv1d:
        return f"base layer {type(base).__name__} (quantized or custom)"
    if base._forward_hooks or base._forward_pre_hooks:
        return "forward hooks on the base layer"
    if is_conv1d != bool(layer.fan_in_fan_out):
        return "fan_in_fan_out does not match the base layer's layout"
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return f"{len(active)} active adapters (one is supported)"
    name = active[0]
    if name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(name):
        return "DoRA or another LoRA variant"
    if layer.lora_B[name].bias is not None or getattr(layer, "lora_bias", {}).get(name):
        return "lora_bias"
    if type(layer.lora_A[name]) is not nn.Linear or type(layer.lora_B[name]) is not nn.Linear:
        return "non-standard lora_A/lora_B modules"
    if _dropout_p(layer.lora_dropout[name]) is None:
        return f"dropout module {type(layer.lora_dropout[name]).__name__}"
    return None


def _fused_forward(layer: nn.Module, peft_forward, backend: str):
    """The replacement forward of one PEFT LoRA Linear: lora_linear on the layer's own
    Parameters, PEFT's forward whenever the call or the layer's state asks for something else."""

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        active = layer.active_adapters
        if (
            args or kwargs or layer.disable_adapters or layer.merged or len(active) != 1
            or active[0] not in layer.lora_A or _static_reason(layer) is not None
        ):
            return peft_forward(x, *args, **kwargs)
        name = active[0]
        base = layer.get_base_layer()
        return lora_linear(
            x, base.weight, base.bias, layer.lora_A[name].weight, layer.lora_B[name].weight,
            layer.scaling[name], _dropout_p(layer.lora_dropout[name]),
            training=layer.training, fan_in_fan_out=bool(layer.fan_in_fan_out), backend=backend,
        )

    return forward


def accelerate(peft_model: nn.Module, *, lora: bool = True, prefix: bool = True,
               backend: str = "auto") -> Acceleration:
    """Make ``peft_model`` (a ``peft.PeftModel`` or a model holding PEFT LoRA layers) run its
    LoRA layers on :func:`lora_kernels.lora_linear` (``lora=True``) and its prefix tuning on
    :func:`lora_kernels.prefix_attention` (``prefix=True``), in place.

    Args:
        peft_model: the model; its parameters, state-dict keys and saved files do not change.
        lora, prefix: which parts to accelerate.
        backend: passed to the ops ("auto", "torch", "triton", "cuda").

    Returns an :class:`Acceleration` handle (``restore()``, context manager). Accelerating a
    model twice restores the first acceleration before applying the second.

    Equivalent PyTorch of one LoRA layer (what PEFT computes)::

        y = base(x) + lora_B(lora_A(dropout(x))) * scaling
    """
    try:
        from peft.tuners.lora.layer import LoraLayer
    except ImportError as e:  # pragma: no cover - peft is a test dependency
        raise ImportError("accelerate(peft_model) needs the peft package installed") from e
    if not isinstance(peft_model, nn.Module):
        raise TypeError(f"accelerate: expected a torch.nn.Module (a PEFT model), got {type(peft_model).__name__}")
    previous = getattr(peft_model, _HANDLE_ATTR, None)
    if previous is not None:
        previous.restore()
    handle = Acceleration(peft_model)
    if lora:
        for name, module in peft_model.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            reason = _static_reason(module)
            if reason is not None:
                handle.skipped[name] = reason
                continue
            peft_forward = types.MethodType(type(module).forward, module)
            module.forward = _fused_forward(module, peft_forward, backend)
            handle.lora_layers.append(name)
            handle._undo.append(lambda m=module: m.__dict__.pop("forward", None))
    if prefix:
        _accelerate_prefix(peft_model, handle, backend)
    if handle.skipped:
        by_reason = defaultdict(list)
        for name, reason in handle.skipped.items():
            by_reason[reason].append(name)
        logger.warning(
            "lora_kernels: %d PEFT layer(s) stay on PEFT's own path: %s",
            len(handle.skipped),
            "; ".join(f"{r} ({len(v)}: {v[0]}{', ...' if len(v) > 1 else ''})" for r, v in by_reason.items()),
        )
    setattr(peft_model, _HANDLE_ATTR, handle)
    return handle


def restore(peft_model: nn.Module) -> None:
    """Undo :func:`accelerate` on ``peft_model`` (no-op when it is not accelerated)."""
    handle = getattr(peft_model, _HANDLE_ATTR, None)
    if handle is not None:
        handle.restore()


def _prefix_reason(peft_model: nn.Module, config) -> str | None:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING

    from . import transformers as hf_attention
    from .model_families import attention_geometry, self_attention_layers

    base = peft_model.base_model
    reason = hf_attention.unsupported_reason(base)
    if reason is not None:
        return reason
    model_type = getattr(base.config, "model_type", "")
    if model_type in TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING:
        return f"PEFT post-processes {model_type}'s prefix"
    if (config.num_transformer_submodules or 1) != 1:
        return "encoder-decoder prefix (two transformer submodules)"
    layers, _, kv_heads, head_dim = attention_geometry(base)
    if (config.num_layers, config.num_attention_heads, config.token_dim) != (layers, kv_heads, kv_heads * head_dim):
        return "the prefix shape does not match the model's attention geometry"
    if len(self_attention_layers(base)) != layers:
        return "not every layer's self-attention calls transformers' attention interface"
    if "position_ids" not in inspect.signature(base.forward).parameters:
        return f"{type(base).__name__}.forward takes no position_ids"
    return None


def _peft_prefix(peft_model: nn.Module, config) -> torch.Tensor:
    """PEFT's prefix of the active adapter as (2 * layers, Hkv, P, D): layer i's keys at 2i, its
    values at 2i + 1 (the layout of ``PeftModel.get_prompt`` for one batch row)."""
    name = peft_model.active_adapter
    encoder = peft_model.prompt_encoder[name]
    P = config.num_virtual_tokens
    if config.inference_mode:
        flat = encoder.embedding.weight[None]
    else:
        tokens = peft_model.prompt_tokens[name][:P].unsqueeze(0).to(encoder.embedding.weight.device)
        flat = encoder(tokens)
    dtype = getattr(peft_model, "base_model_torch_dtype", None)
    if dtype is not None:
        flat = flat.to(dtype)
    heads = config.num_attention_heads
    kv = flat.view(P, config.num_layers * 2, heads, config.token_dim // heads)
    return kv.permute(1, 2, 0, 3)


def _accelerate_prefix(peft_model: nn.Module, handle: Acceleration, backend: str) -> None:
    """PEFT prefix tuning on ``prefix_attention``: an instance ``forward`` on the PeftModel
    computes PEFT's prefix once per call, hands each attention layer its (k, v) through the
    tuning layer's per-module attribute (not the KV cache), shifts the real tokens' positions by
    P as PEFT's cache does, and runs the base model with the fused attention. Calls with a cache,
    explicit positions or task ids, and ``generate``, take PEFT's path."""
    config = getattr(peft_model, "active_peft_config", None)
    if config is None or str(getattr(config, "peft_type", "")).split(".")[-1] != "PREFIX_TUNING":
        return
    reason = _prefix_reason(peft_model, config)
    if reason is not None:
        handle.skipped["<prefix tuning>"] = reason
        return
    from . import transformers as hf_attention
    from .model_families import self_attention_layers

    base = peft_model.base_model
    attn = [m for _, m in self_attention_layers(base)]
    P = config.num_virtual_tokens
    peft_forward = types.MethodType(type(peft_model).forward, peft_model)
    peft_generate = types.MethodType(type(peft_model).generate, peft_model)
    passthrough = {"past_key_values", "cache", "position_ids", "task_ids", "use_cache"}
    state = {"kv": None, "installed": False, "was_enabled": False}

    # The per-layer attributes and the fused attention stay installed after a forward on our
    # path, so that gradient checkpointing recomputes with the same prefix during backward;
    # PEFT's own path (generate, calls with a cache) runs with them removed.
    def install():
        if not state["installed"]:
            for i, module in enumerate(attn):
                hf_attention.set_layer_prefix(module, lambda i=i: (state["kv"][2 * i], state["kv"][2 * i + 1]))
            state["was_enabled"] = hf_attention.is_fused_attention_enabled(base)
            hf_attention.enable_fused_attention(base)
            state["installed"] = True

    def uninstall():
        if state["installed"]:
            for module in attn:
                hf_attention.clear_layer_prefix(module)
            if not state["was_enabled"]:
                hf_attention.disable_fused_attention(base)
            state["installed"] = False

    def on_peft_path(fn, *args, **kwargs):
        uninstall()
        return fn(*args, **kwargs)

    def forward(input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, **kwargs):
        if passthrough & {k for k, v in kwargs.items() if v is not None and v is not False}:
            return on_peft_path(peft_forward, input_ids=input_ids, attention_mask=attention_mask,
                                inputs_embeds=inputs_embeds, labels=labels, **kwargs)
        ref = input_ids if input_ids is not None else inputs_embeds
        state["kv"] = _peft_prefix(peft_model, config)
        install()
        position_ids = torch.arange(P, P + ref.shape[1], device=ref.device).unsqueeze(0)
        return base(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                    labels=labels, position_ids=position_ids, use_cache=False, **kwargs)

    def generate(*args, **kwargs):
        return on_peft_path(peft_generate, *args, **kwargs)

    def undo():
        uninstall()
        peft_model.__dict__.pop("forward", None)
        peft_model.__dict__.pop("generate", None)
        state["kv"] = None

    peft_model.forward = forward
    peft_model.generate = generate
    handle.prefix = True
    handle._undo.append(undo)
