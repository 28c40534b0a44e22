"""prefix_attention: attention where every query also sees a learned prefix of keys/values.
(Placeholder: plain PyTorch until the fused op lands; the signature is final.)"""

from __future__ import annotations

import torch


def prefix_attention(q, k, v, prefix_k=None, prefix_v=None, *, causal=True,
                     key_padding_mask=None, scale=None, dropout_p=0.0, training=True,
                     backend="auto"):
    """q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D), prefix_k/v (Hkv, P, D) or (B, Hkv, P, D),
    key_padding_mask (B, Lk) bool (True = keep) -> (B, Hq, Lq, D)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    keep = torch.ones(B, 1, Lq, Lk, dtype=torch.bool, device=q.device)
    if causal:
        keep = keep & torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(Lk - Lq)
    if key_padding_mask is not None:
        keep = keep & key_padding_mask[:, None, None, :]
    if prefix_k is not None and prefix_k.shape[-2] > 0:
        pk = prefix_k.expand(B, *prefix_k.shape[-3:]) if prefix_k.dim() == 3 else prefix_k
        pv = prefix_v.expand(B, *prefix_v.shape[-3:]) if prefix_v.dim() == 3 else prefix_v
        k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
        keep = torch.cat([keep.new_ones(B, 1, Lq, pk.shape[2]), keep], -1)
    rep = Hq // Hkv
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    if dropout_p > 0 and training:
        p = torch.nn.functional.dropout(p, dropout_p)
    return (p @ v.float()).to(q.dtype)
