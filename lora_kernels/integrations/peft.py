"""Run an existing PEFT model on lora_kernels' fused ops, in place and undoably.

    from lora_kernels.integrations.peft import accelerate
    handle = accelerate(peft_model)      # LoRA layers now call lora_linear
    ...train or generate as before...
    handle.restore()                     # or: with accelerate(peft_model): ...

Nothing about the model changes except which code its LoRA layers run: no parameter is created,
moved or renamed, so ``state_dict()`` keys and ``save_pretrained`` files stay PEFT's own. Each
``peft.tuners.lora.Linear`` over ``nn.Linear`` or GPT-2's ``Conv1D`` changes class to
:class:`FusedLoraLinear` (a subclass whose ``forward`` calls :func:`lora_kernels.lora_linear` with
the layer's own Parameters); ``restore`` puts the class back. Being a class, not a closure, it
survives ``copy.deepcopy`` (the copy computes with its own tensors) and pickling (``torch.save``;
loading needs lora_kernels importable). Every call decides: a layer that is merged, has adapters
disabled, has no or several active adapters, runs an adapter PEFT computes differently (DoRA and
other LoRA variants, ``lora_bias``), has a tensor ``scaling`` (PEFT's
``prepare_model_for_compiled_hotswap``) or hooks on its base layer, or gets ``adapter_names``
(mixed batches), takes PEFT's own forward for that call. Layers of other types (quantized or
custom base layers, embeddings, convolutions) keep PEFT's class. What is on PEFT's path at
``accelerate`` time is reported in one log warning.

Prefix tuning: a PEFT prefix-tuning model (decoder or encoder; GPT-2, LLaMA, BERT, ...) changes
class to a subclass whose forward runs on the tuning layer's attention integration: PEFT's prefix
(same parameters) goes to ``prefix_attention`` through per-layer attributes instead of the KV
cache, which also makes it work under gradient checkpointing; ``generate`` and calls with a cache
stay on PEFT's path.

peft is imported only inside these functions, never when ``lora_kernels`` is imported.
"""

from __future__ import annotations

import inspect
import logging
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from ..ops import lora_linear
from . import transformers as hf_attention
from .model_families import attention_geometry, self_attention_layers

logger = logging.getLogger(__name__)
_BACKEND_ATTR = "_lora_kernels_backend"
_STATE_ATTR = "_lora_kernels_prefix_state"
_PREFIX_CLASS = "PrefixAccelerated"
_CLASSES: dict[str, type] = {}


@dataclass
class Acceleration:
    """What :func:`accelerate` did: ``lora_layers`` (module names now of class
    :class:`FusedLoraLinear`, on ``lora_linear`` whenever a call allows), ``prefix`` (True when
    prefix tuning runs on ``prefix_attention``), ``skipped`` ({module name: reason} for what takes
    PEFT's path at ``accelerate`` time). ``restore()`` undoes it; usable as a context manager."""

    model: nn.Module
    lora_layers: list[str] = field(default_factory=list)
    prefix: bool = False
    skipped: dict[str, str] = field(default_factory=dict)

    def restore(self) -> None:
        """Put every layer back on PEFT's own forward (idempotent)."""
        restore(self.model)

    def __enter__(self) -> Acceleration:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


# -- LoRA layers ----------------------------------------------------------------------------
def _dropout_p(module: nn.Module) -> float | None:
    if isinstance(module, nn.Identity):
        return 0.0
    if type(module) is nn.Dropout:
        return float(module.p)
    return None


def _layer_reason(layer: nn.Module) -> str | None:
    """Why this PEFT LoRA layer never runs on lora_linear (None: it can)."""
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    if type(layer) not in (PeftLoraLinear, _CLASSES.get("FusedLoraLinear")):
        return f"layer type {type(layer).__module__}.{type(layer).__name__}"
    base = layer.get_base_layer()
    is_conv1d = type(base).__name__ == "Conv1D" and hasattr(base, "nf")
    if type(base) is not nn.Linear and not is_conv1d:
        return f"base layer {type(base).__name__} (quantized or custom)"
    if is_conv1d != bool(layer.fan_in_fan_out):
        return "fan_in_fan_out does not match the base layer's layout"
    return None


def _call_reason(layer: nn.Module) -> str | None:
    """Why this call of a supported layer takes PEFT's path (its adapter state), or None."""
    if layer.disable_adapters:
        return "adapters disabled"
    if layer.merged:
        return "merged"
    base = layer.get_base_layer()
    if base._forward_hooks or base._forward_pre_hooks:
        return "forward hooks on the base layer"
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return f"{len(active)} active adapters on this layer (one is supported)"
    name = active[0]
    if name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(name):
        return "DoRA or another LoRA variant"
    if layer.lora_B[name].bias is not None or getattr(layer, "lora_bias", {}).get(name):
        return "lora_bias"
    if type(layer.lora_A[name]) is not nn.Linear or type(layer.lora_B[name]) is not nn.Linear:
        return "non-standard lora_A/lora_B modules"
    if _dropout_p(layer.lora_dropout[name]) is None:
        return f"dropout module {type(layer.lora_dropout[name]).__name__}"
    if isinstance(layer.scaling[name], torch.Tensor):
        return "tensor scaling (PEFT's compiled hotswap)"
    return None


class _FusedLoraForward:
    """The forward of :class:`FusedLoraLinear` (a mixin before PEFT's ``lora.Linear``)."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs or _call_reason(self) is not None:
            return super().forward(x, *args, **kwargs)
        name = next(a for a in self.active_adapters if a in self.lora_A)
        base = self.get_base_layer()
        return lora_linear(
            x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
            self.scaling[name], _dropout_p(self.lora_dropout[name]), training=self.training,
            fan_in_fan_out=bool(self.fan_in_fan_out), backend=self.__dict__.get(_BACKEND_ATTR, "auto"),
        )


def _fused_lora_class() -> type:
    """``FusedLoraLinear``: PEFT's ``lora.Linear`` with ``_FusedLoraForward.forward``, made on
    first use (peft is imported then) and reachable as a module attribute, so pickle finds it."""
    cls = _CLASSES.get("FusedLoraLinear")
    if cls is None:
        from peft.tuners.lora.layer import Linear as PeftLoraLinear

        cls = type("FusedLoraLinear", (_FusedLoraForward, PeftLoraLinear),
                   {"__module__": __name__, "__doc__": "PEFT's lora.Linear running on lora_linear."})
        _CLASSES["FusedLoraLinear"] = cls
    return cls


def __getattr__(name: str):
    """``FusedLoraLinear`` and the ``PrefixAccelerated<PeftModel class>`` classes, made on demand
    (what unpickling an accelerated model asks for)."""
    if name == "FusedLoraLinear":
        return _fused_lora_class()
    if name.startswith(_PREFIX_CLASS):
        import peft.peft_model

        base = getattr(peft.peft_model, name[len(_PREFIX_CLASS):], None)
        if isinstance(base, type):
            return _prefix_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- entry points ---------------------------------------------------------------------------
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
    restore(peft_model)
    handle = Acceleration(peft_model)
    if lora:
        fused = _fused_lora_class()
        for name, module in peft_model.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            reason = _layer_reason(module)
            if reason is not None:
                handle.skipped[name] = reason
                continue
            module.__class__ = fused
            module.__dict__[_BACKEND_ATTR] = backend
            handle.lora_layers.append(name)
            reason = _call_reason(module)
            if reason is not None:
                handle.skipped[name] = f"{reason} (checked again at every call)"
    if prefix:
        _accelerate_prefix(peft_model, handle)
    if handle.skipped:
        by_reason = defaultdict(list)
        for name, reason in handle.skipped.items():
            by_reason[reason].append(name)
        logger.warning(
            "lora_kernels: %d PEFT layer(s) on PEFT's own path: %s",
            len(handle.skipped),
            "; ".join(f"{r} ({len(v)}: {v[0]}{', ...' if len(v) > 1 else ''})" for r, v in by_reason.items()),
        )
    return handle


def restore(peft_model: nn.Module) -> None:
    """Undo :func:`accelerate` on ``peft_model`` or a copy of it (no-op when not accelerated)."""
    for module in peft_model.modules():
        if isinstance(module, _FusedLoraForward):
            module.__class__ = type(module).__bases__[-1]
            module.__dict__.pop(_BACKEND_ATTR, None)
    if isinstance(peft_model, _PrefixForward):
        peft_model.__dict__[_STATE_ATTR].uninstall(peft_model.base_model)
        peft_model.__class__ = type(peft_model).__bases__[-1]
        del peft_model.__dict__[_STATE_ATTR]


# -- prefix tuning ---------------------------------------------------------------------------
def _prefix_reason(peft_model: nn.Module, config) -> str | None:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING

    base = peft_model.base_model
    if type(peft_model).__module__ != "peft.peft_model":
        return f"PeftModel subclass {type(peft_model).__name__}"
    reason = hf_attention.unsupported_reason(base)
    if reason is not None:
        return reason
    model_type = getattr(base.config, "model_type", "")
    if model_type in TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING:
        return f"PEFT post-processes {model_type}'s prefix"
    if (config.num_transformer_submodules or 1) != 1:
        return "encoder-decoder prefix (two transformer submodules)"
    if _geometry(config) != _model_geometry(base):
        return "the prefix shape does not match the model's attention geometry"
    if len(self_attention_layers(base)) != _model_geometry(base)[0]:
        return "not every layer's self-attention calls transformers' attention interface"
    if "position_ids" not in inspect.signature(base.forward).parameters:
        return f"{type(base).__name__}.forward takes no position_ids"
    return None


def _geometry(config) -> tuple:
    return config.num_layers, config.num_attention_heads, config.token_dim


def _model_geometry(base: nn.Module) -> tuple:
    layers, _, kv_heads, head_dim = attention_geometry(base)
    return layers, kv_heads, kv_heads * head_dim


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


class _PrefixState:
    """Per accelerated model: its self-attention modules (names under the base model), the
    geometry it was checked for, this call's prefix ``kv`` and whether the per-layer prefix and
    our attention are installed. The prefix stays installed after a forward on our path, so that
    gradient checkpointing recomputes with it during backward; PEFT's path runs without it."""

    def __init__(self, layer_names: list[str], geometry: tuple) -> None:
        self.layer_names, self.geometry = layer_names, geometry
        self.kv: torch.Tensor | None = None
        self.installed = self.was_enabled = False

    def __getstate__(self) -> dict:  # the last call's prefix (part of a graph) is not copied
        return {**self.__dict__, "kv": None}

    def install(self, base: nn.Module) -> None:
        if not self.installed:
            for i, name in enumerate(self.layer_names):
                hf_attention.set_layer_prefix(base.get_submodule(name), _LayerKV(self, i))
            self.was_enabled = hf_attention.is_fused_attention_enabled(base)
            hf_attention.enable_fused_attention(base)
            self.installed = True

    def uninstall(self, base: nn.Module) -> None:
        if self.installed:
            for name in self.layer_names:
                hf_attention.clear_layer_prefix(base.get_submodule(name))
            if not self.was_enabled:
                hf_attention.disable_fused_attention(base)
            self.installed = False


class _LayerKV:
    """Layer ``i``'s (k, v), each (Hkv, P, D), from the state's current prefix."""

    def __init__(self, state: _PrefixState, i: int) -> None:
        self.state, self.i = state, i

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        kv = self.state.kv
        return kv[2 * self.i], kv[2 * self.i + 1]


_PASSTHROUGH = {"past_key_values", "cache", "position_ids", "task_ids", "use_cache"}


class _PrefixForward:
    """forward/generate of an accelerated PEFT prefix-tuning model (a mixin before its PEFT
    class): PEFT's prefix computed once per call and handed to each attention layer, the real
    tokens' positions shifted by P as PEFT's cache does. Calls with a cache, explicit positions
    or task ids, ``generate``, and an active adapter that is not this prefix take PEFT's path."""

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, **kwargs):
        state: _PrefixState = self.__dict__[_STATE_ATTR]
        config = self.active_peft_config
        on_peft = _PASSTHROUGH & {k for k, v in kwargs.items() if v is not None and v is not False}
        if on_peft or str(getattr(config.peft_type, "value", config.peft_type)) != "PREFIX_TUNING" \
                or _geometry(config) != state.geometry:
            state.uninstall(self.base_model)
            return super().forward(input_ids=input_ids, attention_mask=attention_mask,
                                   inputs_embeds=inputs_embeds, labels=labels, **kwargs)
        ref = input_ids if input_ids is not None else inputs_embeds
        state.kv = _peft_prefix(self, config)
        state.install(self.base_model)
        P = config.num_virtual_tokens
        position_ids = torch.arange(P, P + ref.shape[1], device=ref.device).unsqueeze(0)
        return self.base_model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                               labels=labels, position_ids=position_ids, use_cache=False, **kwargs)

    def generate(self, *args, **kwargs):
        self.__dict__[_STATE_ATTR].uninstall(self.base_model)
        return super().generate(*args, **kwargs)


def _prefix_class(peft_class: type) -> type:
    """``PrefixAccelerated<PeftModel class>``, made once and reachable as a module attribute."""
    name = _PREFIX_CLASS + peft_class.__name__
    cls = _CLASSES.get(name)
    if cls is None:
        cls = type(name, (_PrefixForward, peft_class), {"__module__": __name__})
        _CLASSES[name] = cls
    return cls


def _accelerate_prefix(peft_model: nn.Module, handle: Acceleration) -> None:
    config = getattr(peft_model, "active_peft_config", None)
    if config is None or str(getattr(config, "peft_type", "")).split(".")[-1] != "PREFIX_TUNING":
        return
    reason = _prefix_reason(peft_model, config)
    if reason is not None:
        handle.skipped["<prefix tuning>"] = reason
        return
    names = [name for name, _ in self_attention_layers(peft_model.base_model)]
    peft_model.__dict__[_STATE_ATTR] = _PrefixState(names, _geometry(config))
    peft_model.__class__ = _prefix_class(type(peft_model))
    handle.prefix = True
