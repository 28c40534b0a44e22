"""Our attention inside transformers (5.x) models: an attention function and a mask function
registered under one name in ``transformers.AttentionInterface`` and
``transformers.masking_utils.AttentionMaskInterface``.

The attention function calls ``lora_kernels.prefix_attention`` with the layer's prefix (read
from the plain callable attribute ``PREFIX_ATTR`` on the attention module; P = 0 when there is
none). transformers' mask is turned into causal + key padding; a mask that cannot be expressed
that way (sliding window, packed sequences, ALiBi-like float biases, ...) and the extras of some
families (T5's position_bias, Gemma 2's softcap, gpt-oss's sinks) go to a plain PyTorch path
with the full mask: never silently wrong.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from ..ops import prefix_attention
from ..reference.prefix_attention import causal_keep
from .model_families import attention_modules

ATTENTION_NAME = "lora_kernels"
PREFIX_ATTR = "lora_kernels_prefix"
_PREVIOUS_ATTR = "_lora_kernels_previous_attn_implementation"

# One-entry memo: every layer of a forward gets the same mask tensor, decompose it once.
_last_decomposition: tuple | None = None


def _keep_mask(mask: torch.Tensor) -> torch.Tensor | None:
    """bool keep-mask (True = attend) from a bool or additive float mask; None when the float
    mask holds biases other than 0 and "masked" (a large negative value)."""
    if mask.dtype == torch.bool:
        return mask
    masked = mask <= torch.finfo(mask.dtype).min / 2
    if not torch.all(masked | (mask == 0)):
        return None
    return ~masked


def decompose_mask(mask: torch.Tensor, causal_first: bool) -> tuple[bool, torch.Tensor] | None:
    """mask (B, 1 or H, Lq, Lk) -> (causal, key_padding_mask (B, Lk) bool) such that
    ``causal (bottom-right) & key_padding`` equals the mask exactly, or None."""
    global _last_decomposition
    memo = _last_decomposition
    if memo is not None and memo[0]() is mask and memo[1] == mask._version and memo[2] == causal_first:
        return memo[3]
    result = _decompose(mask, causal_first)
    try:
        _last_decomposition = (weakref.ref(mask), mask._version, causal_first, result)
    except TypeError:
        _last_decomposition = None
    return result


def _decompose(mask: torch.Tensor, causal_first: bool) -> tuple[bool, torch.Tensor] | None:
    if mask.dim() != 4:
        return None
    keep = _keep_mask(mask)
    if keep is None:
        return None
    if keep.shape[1] != 1 and not torch.equal(keep, keep[:, :1].expand_as(keep)):
        return None
    keep = keep[:, 0]
    Lq, Lk = keep.shape[-2:]
    kpm = keep[:, -1, :]
    tril = causal_keep(Lq, Lk, keep.device)
    for causal in ((True, False) if causal_first else (False, True)):
        expected = kpm[:, None, :] & tril if causal else kpm[:, None, :].expand_as(keep)
        if torch.equal(keep, expected):
            return causal, (None if bool(kpm.all()) else kpm.contiguous())
    return None


def masked_attention_reference(query, key, value, prefix_k, prefix_v, mask, scale, dropout_p, training, *,
                               causal=False, position_bias=None, softcap=None, sinks=None):
    """Plain PyTorch attention for what the fused op does not express, with an always-visible
    prefix: query (B, Hq, Lq, D), key/value (B, Hkv, Lk, D), prefix (Hkv, P, D) or None; mask
    (B, 1 or Hq, Lq, Lk) bool keep-mask or additive float, or None (then ``causal``,
    bottom-right); ``position_bias`` (B or 1, Hq, Lq, Lk) added to the sequence scores (T5);
    ``softcap``: scores -> softcap * tanh(scores / softcap) (Gemma 2); ``sinks`` (Hq,): one
    extra logit per head in the softmax denominator (gpt-oss). Returns (B, Hq, Lq, D)."""
    B, Hq, Lq, _ = query.shape
    Hkv, Lk = key.shape[1], key.shape[2]
    P = 0 if prefix_k is None else prefix_k.shape[-2]
    if P:
        key = torch.cat([prefix_k.expand(B, *prefix_k.shape[-3:]), key], 2)
        value = torch.cat([prefix_v.expand(B, *prefix_v.shape[-3:]), value], 2)
    key = key.repeat_interleave(Hq // Hkv, 1)
    value = value.repeat_interleave(Hq // Hkv, 1)
    scores = (query.float() @ key.float().transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    bias = torch.zeros(1, 1, Lq, Lk, device=query.device)
    if mask is None:
        if causal:
            tril = causal_keep(Lq, Lk, query.device)
            bias = bias.masked_fill(~tril, float("-inf"))
    elif mask.dtype == torch.bool:
        bias = bias.masked_fill(~mask, float("-inf"))
    else:
        bias = bias + mask.float()
    if position_bias is not None:
        bias = bias + position_bias.float()
    if P:
        bias = torch.cat([bias.new_zeros(*bias.shape[:-1], P), bias], -1)
    scores = scores + bias
    if sinks is not None:
        sink = sinks.float().reshape(1, Hq, 1, 1).expand(B, Hq, Lq, 1)
        probs = torch.softmax(torch.cat([scores, sink], -1), -1)[..., :-1]
    else:
        probs = torch.softmax(scores, -1)
    probs = probs.nan_to_num(0.0)
    if dropout_p > 0 and training:
        probs = nn.functional.dropout(probs, dropout_p)
    return (probs @ value.float()).to(query.dtype)


def set_layer_prefix(module: nn.Module, prefix_fn) -> None:
    """Give an attention module its prefix: ``prefix_fn()`` returns ``(k, v)``, each
    (Hkv, P, D). A plain attribute, not a submodule: the state dict does not change."""
    module.__dict__[PREFIX_ATTR] = prefix_fn


def clear_layer_prefix(module: nn.Module):
    """Take an attention module's prefix away; returns it (None when it had none)."""
    return module.__dict__.pop(PREFIX_ATTR, None)


def layer_prefix(module: nn.Module):
    """The attention module's prefix function, or None."""
    return module.__dict__.get(PREFIX_ATTR)


def lora_kernels_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function. query (B, Hq, Lq, D), key/value (B, Hkv, Lk, D)
    (not repeated for GQA), attention_mask (B, 1, Lq, Lk) bool/float or None ->
    ``(out (B, Lq, Hq, D), None)``. Fused (``prefix_attention``) when the mask is causal +
    key padding; the plain PyTorch path otherwise, for more queries than keys (cross-attention
    from a longer decoder), and for ``position_bias`` (T5), ``softcap`` (Gemma 2) and
    attention sinks (``s_aux``).

    Equivalent PyTorch (no prefix, no padding)::

        out = F.scaled_dot_product_attention(query, key, value, is_causal=module.is_causal,
                                             enable_gqa=True).transpose(1, 2)
    """
    prefix_fn = layer_prefix(module)
    prefix_k = prefix_v = None
    if prefix_fn is not None:
        prefix_k, prefix_v = prefix_fn()
        prefix_k, prefix_v = prefix_k.to(query.dtype), prefix_v.to(query.dtype)
    if kwargs.get("head_mask") is not None:
        raise NotImplementedError("lora_kernels attention: head_mask is not supported")
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = bool(getattr(module, "is_causal", True))
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    dropout_p = float(dropout or 0.0)
    training = module.training
    if attention_mask is not None and attention_mask.shape[-1] != key.shape[-2]:
        raise ValueError(
            f"lora_kernels attention: the mask covers {attention_mask.shape[-1]} keys but the layer "
            f"has {key.shape[-2]} (prefix tuning here keeps the prefix out of the mask: pass the "
            "attention mask of the real tokens only)"
        )
    extras = {"position_bias": kwargs.get("position_bias"), "softcap": kwargs.get("softcap"),
              "sinks": kwargs.get("s_aux", kwargs.get("sinks"))}
    Lq = query.shape[-2]
    if attention_mask is None and is_causal and 1 < Lq < key.shape[-2]:
        # transformers skips the mask only where SDPA's is_causal (upper-left) is right: with
        # Lq < Lk, a prefill into an empty static cache whose keys past Lq are unused slots.
        # Upper-left causal never sees keys >= Lq; on the first Lq keys it is bottom-right.
        key, value = key[:, :, :Lq], value[:, :, :Lq]
        if extras["position_bias"] is not None:
            extras["position_bias"] = extras["position_bias"][..., :Lq]
    found = None
    # more queries than keys (cross-attention from a longer decoder) is not the op's "queries
    # are the last Lq of the Lk positions": the plain path serves it
    if all(v is None for v in extras.values()) and query.shape[-2] <= key.shape[-2]:
        found = (is_causal, None) if attention_mask is None else decompose_mask(attention_mask, is_causal)
    if found is None:
        out = masked_attention_reference(query, key, value, prefix_k, prefix_v, attention_mask, scale,
                                         dropout_p, training, causal=is_causal, **extras)
        return out.transpose(1, 2).contiguous(), None
    causal, kpm = found
    out = prefix_attention(query, key, value, prefix_k, prefix_v, causal=causal, key_padding_mask=kpm,
                           scale=scale, dropout_p=dropout_p, training=training)
    return out.transpose(1, 2).contiguous(), None


def lora_kernels_mask(*args, **kwargs):
    """transformers mask function: the boolean mask of ``sdpa_mask`` (True = attend), or None
    where transformers can skip it (causal without padding and Lq == Lk or Lq == 1, or a
    prefill into an empty static cache, read upper-left as SDPA's ``is_causal``; full attention
    without padding): the attention function then applies ``module.is_causal``."""
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def register() -> str:
    """Register the attention and mask functions under ``ATTENTION_NAME`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, lora_kernels_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, lora_kernels_mask)
    return ATTENTION_NAME


def unsupported_reason(model: nn.Module) -> str | None:
    """Why our attention cannot reach this model, or None when it can."""
    if not hasattr(model, "set_attn_implementation") or not hasattr(model, "config"):
        return f"{type(model).__name__} is not a transformers PreTrainedModel"
    can_set = getattr(model, "_can_set_attn_implementation", None)
    if callable(can_set) and not can_set():
        return (f"{type(model).__name__} does not dispatch attention through transformers' "
                "AttentionInterface (its attention cannot be set dynamically)")
    if not attention_modules(model):
        return (f"{type(model).__name__} has no attention module that calls transformers' "
                "AttentionInterface (ALL_ATTENTION_FUNCTIONS), so a registered attention function "
                "would never run")
    return None


def enable_fused_attention(model: nn.Module) -> nn.Module:
    """Make ``model`` (a transformers PreTrainedModel) run its attention through
    ``prefix_attention``, in place; returns the model. Raises ``ValueError`` saying why for a
    model whose attention does not go through transformers' AttentionInterface.

    Equivalent::

        transformers.AttentionInterface.register("lora_kernels", fn)
        model.set_attn_implementation("lora_kernels")
    """
    reason = unsupported_reason(model)
    if reason is not None:
        raise ValueError(f"enable_fused_attention: {reason}")
    register()
    previous = model.config._attn_implementation
    if previous == ATTENTION_NAME:
        return model
    model.set_attn_implementation(ATTENTION_NAME)
    if model.config._attn_implementation != ATTENTION_NAME:
        model.set_attn_implementation(previous)
        raise ValueError(f"enable_fused_attention: {type(model).__name__} refused attn_implementation "
                         f"{ATTENTION_NAME!r} (kept {previous!r})")
    model.__dict__[_PREVIOUS_ATTR] = previous
    return model


def disable_fused_attention(model: nn.Module) -> nn.Module:
    """Undo ``enable_fused_attention``: the attention implementation the model had before."""
    previous = model.__dict__.pop(_PREVIOUS_ATTR, None)
    if previous is not None and model.config._attn_implementation == ATTENTION_NAME:
        model.set_attn_implementation(previous)
    return model


def is_fused_attention_enabled(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == ATTENTION_NAME


__all__ = [
    "ATTENTION_NAME",
    "PREFIX_ATTR",
    "clear_layer_prefix",
    "layer_prefix",
    "set_layer_prefix",
    "enable_fused_attention",
    "disable_fused_attention",
    "is_fused_attention_enabled",
    "lora_kernels_attention",
    "lora_kernels_mask",
    "register",
    "unsupported_reason",
]
