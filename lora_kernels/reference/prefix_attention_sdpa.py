"""prefix_attention through SDPA's fused kernels: the torch backend on CUDA tensors.

What PEFT's prefix tuning reaches (the prefix in the key/value cache, then
``scaled_dot_product_attention``), with every call shaped so that the flash or the
memory-efficient kernel serves it:

- keys and values: the prefix concatenated before the sequence, one copy (PEFT pays it too);
  grouped-query heads read in place (``enable_gqa``) where flash serves, else repeated inside
  that same copy (the memory-efficient kernel takes no grouped heads).
- no padding: SDPA without a mask, ``is_causal`` when the mask is square (no prefix and
  Lq == Lk), nothing when it is not causal or for one query (it sees every key). The other
  causal cases (a prefix, or queries that are the last Lq of Lk keys) are bottom-right causal:
  where flash serves, ``aten._scaled_dot_product_flash_attention(is_causal=True)``, whose causal
  mask is bottom-right (the call ``torch.nn.attention.bias.causal_lower_right`` makes in eager
  mode; made here directly because that tensor subclass does not trace under torch.compile);
  else an (Lq, P + Lk) bool mask, which the memory-efficient kernel takes.
- padding: one (B, 1, Lq, P + Lk) bool mask, which the memory-efficient kernel takes. A row that
  sees no key (fully padded, no prefix) is given every key and its output set to 0 afterwards:
  output and gradients exactly 0, never NaN.
- dropout: SDPA's own ``dropout_p``.

The backward is autograd's: SDPA's fused backward kernels with the log-sum-exp the forward kept,
nothing recomputed. No (B, H, Lq, P + Lk) tensor exists. The oracle of the tests is
:func:`lora_kernels.reference.prefix_attention.oracle`.

Why this design: plain differentiable SDPA, outside the custom op, is what PEFT runs, so it can
be no slower by construction, and autograd owns its backward. The alternative, the CPU path's
split (prefix and sequence apart) merged by log-sum-exp on CUDA's aten flash / efficient ops,
avoids the concatenation but needs their backward ops called by hand with merged statistics,
per kernel and per PyTorch version: more to keep correct for a copy of (B, Hkv, P + Lk, D).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .prefix_attention import causal_keep, oracle

# Tests set this to run the SDPA path on CPU tensors (SDPA's CPU kernels); by default CPU tensors
# take the torch backend's custom op (the split CPU flash path), every other device this path.
SDPA_ON_CPU = False
# FlashAttention 2 through PyTorch: its is_causal is bottom-right aligned (tests stand in for it)
_flash_op = torch.ops.aten._scaled_dot_product_flash_attention.default


def serves(device: torch.device) -> bool:
    """Whether the torch backend runs this path for tensors on ``device``."""
    return device.type != "cpu" or SDPA_ON_CPU


def concat_keys(prefix: torch.Tensor | None, seq: torch.Tensor, groups: int) -> torch.Tensor:
    """``cat([prefix, seq], 2)`` with each kv head repeated ``groups`` times, in one copy (none
    without a prefix and groups): prefix (Bp, Hkv, P, D) with Bp in {1, B}, seq (B, Hkv, L, D)
    -> (B, Hkv * groups, P + L, D)."""
    if prefix is None and groups == 1:
        return seq
    B, Hkv, L, D = seq.shape
    parts = [seq[:, :, None].expand(B, Hkv, groups, L, D)]
    if prefix is not None:
        parts.insert(0, prefix[:, :, None].expand(B, Hkv, groups, prefix.shape[2], D))
    return torch.cat(parts, 3).view(B, Hkv * groups, -1, D)


@torch.compiler.assume_constant_result
def flash_serves(device: torch.device, dtype: torch.dtype, Hq: int, Hkv: int, D: int,
                 dropout_p: float, needs_grad: bool) -> bool:
    """Whether SDPA's flash kernel takes unmasked attention of such inputs: PyTorch's own check
    (``torch.backends.cuda.can_use_flash_attention``) on stand-ins, and flash not switched off.
    Under torch.compile it runs once at trace time; its result is a constant of the graph."""
    if device.type != "cuda" or not torch.backends.cuda.flash_sdp_enabled():
        return False
    return _flash_check(device, dtype, Hq, Hkv, D, float(dropout_p), bool(needs_grad))


@functools.lru_cache(maxsize=64)
def _flash_check(device, dtype, Hq, Hkv, D, dropout_p, needs_grad) -> bool:
    def like(heads):
        base = torch.empty(D, dtype=dtype, device=device, requires_grad=needs_grad)
        return base.as_strided((1, heads, 1, D), (0, 0, 0, 1))

    params = torch.backends.cuda.SDPAParams(like(Hq), like(Hkv), like(Hkv), None, dropout_p,
                                            False, Hq != Hkv)
    return bool(torch.backends.cuda.can_use_flash_attention(params))


def _flash_bottom_right(q, k, v, dropout_p, scale):
    """Flash attention with its bottom-right causal mask (FlashAttention 2 aligns ``is_causal``
    to the last key); grouped heads in place. Head dims padded to a multiple of 8, as SDPA does."""
    D = q.shape[-1]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    pad = -D % 8
    if pad:
        q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
    out = _flash_op(q, k, v, dropout_p, True, False, scale=scale)[0]
    return out[..., :D] if pad else out


def attention(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, dropout_p):
    """q (B, Hq, Lq, D); k, v (B, Hkv, Lk, D); prefix_k/v (Bp, Hkv, P, D) with P > 0, or None;
    key_padding_mask (B, Lk) bool or None; dropout_p applied as given (0 outside training)
    -> out (B, Hq, Lq, D) in q's dtype, differentiable by autograd."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if q.numel() == 0:  # no query: an empty output, zero gradients (no kernel takes Lq = 0)
        return oracle(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale)
    P = 0 if prefix_k is None else prefix_k.shape[2]
    keys_len = P + Lk
    groups = Hq // Hkv
    bottom_right = causal and 1 < Lq < keys_len  # else: square (is_causal), or sees every key
    is_causal = causal and Lq == keys_len
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, prefix_k, prefix_v))
    flash = key_padding_mask is None and flash_serves(q.device, q.dtype, Hq, Hkv, D, dropout_p,
                                                      needs_grad)
    kv_groups = 1 if flash else groups
    keys = concat_keys(prefix_k, k, kv_groups)
    values = concat_keys(prefix_v, v, kv_groups)
    if flash and bottom_right:
        return _flash_bottom_right(q, keys, values, dropout_p, scale)
    if key_padding_mask is None and not bottom_right:
        return F.scaled_dot_product_attention(q, keys, values, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale,
                                              enable_gqa=kv_groups != groups)
    keep = causal_keep(Lq, keys_len, q.device) if causal else None  # prefix keys always seen
    empty = None
    if key_padding_mask is not None:
        pad = key_padding_mask
        if P:
            pad = torch.cat([pad.new_ones(B, P), pad], 1)
        pad = pad.view(B, 1, 1, keys_len)
        keep = pad if keep is None else keep & pad
        if P == 0:  # a fully padded row sees no key: give it every key, zero its output
            empty = ~keep.any(-1, keepdim=True)
            keep = keep | empty
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=keep, dropout_p=dropout_p,
                                         scale=scale)
    return out if empty is None else out.masked_fill(empty, 0.0)
