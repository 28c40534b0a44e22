"""Prefix tuning: a ``PrefixEncoder`` whose per-layer (k, v) reach each self-attention module
through the attention integration's prefix attribute (not the KV cache), with the real tokens'
position ids shifted by P as in PEFT."""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch
from torch import nn

from ..integrations import transformers as hf_attention
from ..integrations.model_families import attention_geometry, self_attention_layers
from ..nn.prefix_encoder import PrefixEncoder
from .changes import apply_modules_to_save, enable_attention, freeze
from .config import PrefixTuningConfig
from .targets import modules_to_save_names

# The number of virtual tokens, as a plain attribute of the base model read by its pre-hook.
POSITION_ATTR = "lora_kernels_position_offset"


def tune_prefix(tuned, config: PrefixTuningConfig) -> None:
    """Check the model's attention geometry against the config, build the encoder (fp32 over
    a half-precision model), freeze the model and attach the prefix to every layer."""
    model = tuned.base_model
    layers_n, heads, kv_heads, head_dim = attention_geometry(model)
    attn = self_attention_layers(model)
    reason = hf_attention.unsupported_reason(model)
    if reason is not None:
        raise ValueError(f"PrefixTuningConfig: {reason}")
    if len(attn) != layers_n:
        raise ValueError(f"PrefixTuningConfig: found {len(attn)} self-attention modules calling the "
                         f"attention interface but the config says {layers_n} layers")
    for field, expected in (("num_layers", layers_n), ("num_attention_heads", kv_heads),
                            ("token_dim", kv_heads * head_dim)):
        given = getattr(config, field)
        if given is not None and given != expected:
            raise ValueError(f"PrefixTuningConfig.{field}={given} does not fit {type(model).__name__} "
                             f"(expected {expected})")
    if "position_ids" not in inspect.signature(model.forward).parameters:
        raise ValueError(f"PrefixTuningConfig: {type(model).__name__}.forward takes no position_ids, so the "
                         "real tokens' positions cannot start after the prefix")
    keep = modules_to_save_names(model, config)
    config.num_layers, config.num_attention_heads, config.token_dim = layers_n, kv_heads, kv_heads * head_dim
    config.num_transformer_submodules = config.num_transformer_submodules or 1
    if config.encoder_hidden_size is None:  # as PEFT
        config.encoder_hidden_size = config.token_dim
    param = next(model.parameters())
    encoder = PrefixEncoder(config.num_virtual_tokens, layers_n, kv_heads, head_dim,
                            prefix_projection=config.prefix_projection, token_dim=config.token_dim,
                            encoder_hidden_size=config.encoder_hidden_size, device=param.device,
                            dtype=torch.float32 if param.dtype in (torch.float16, torch.bfloat16) else param.dtype)
    freeze(tuned)
    enable_attention(tuned, required=True)
    tuned.prefix_encoder = encoder
    _attach(tuned, encoder, attn)
    apply_modules_to_save(tuned, keep)


def _attach(tuned, encoder: PrefixEncoder, attn: list[tuple[str, nn.Module]]) -> None:
    """Give each self-attention module its layer's (k, v) and shift the real tokens' position
    ids by P (a forward pre-hook on the base model)."""
    model = tuned.base_model
    for index, (_, module) in enumerate(attn):
        hf_attention.set_layer_prefix(module, functools.partial(encoder.layer_prefix, index))
    model.__dict__[POSITION_ATTR] = encoder.num_virtual_tokens

    def detach():
        for _, module in attn:
            hf_attention.clear_layer_prefix(module)
        model.__dict__.pop(POSITION_ATTR, None)

    tuned.on_unload(detach)
    handle = model.register_forward_pre_hook(_shift_positions, with_kwargs=True)
    tuned.on_unload(handle.remove)


def _shift_positions(module, args, kwargs):
    """Forward pre-hook on the base model: the real tokens' position ids start at P (read from
    the model's ``POSITION_ATTR``, so copies of the model carry their own)."""
    P = module.__dict__.get(POSITION_ATTR)
    if not P:
        return None
    ids = kwargs.get("input_ids", args[0] if args else None)
    embeds = kwargs.get("inputs_embeds")
    ref = ids if ids is not None else embeds
    if ref is None:
        return None
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        position_ids = torch.arange(past, past + ref.shape[1], device=ref.device).unsqueeze(0)
    kwargs["position_ids"] = position_ids + P
    return args, kwargs


@contextlib.contextmanager
def prefix_detached(model: nn.Module):
    """Within the block ``model`` runs without its prefix (every layer's prefix and the position
    shift taken away, then put back)."""
    removed = {}
    for name, module in model.named_modules():
        prefix_fn = hf_attention.clear_layer_prefix(module)
        if prefix_fn is not None:
            removed[name] = prefix_fn
    offset = model.__dict__.pop(POSITION_ATTR, None)
    try:
        yield
    finally:
        for name, prefix_fn in removed.items():
            hf_attention.set_layer_prefix(model.get_submodule(name), prefix_fn)
        if offset is not None:
            model.__dict__[POSITION_ATTR] = offset
