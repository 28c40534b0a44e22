"""``cuda`` backend of ``prefix_attention``: FlashAttention-2-style kernels from
``csrc/prefix_attention`` (fp16/bf16, head dims 64 and 128; ``mma.sync`` tensor cores with every
accumulator in registers, ``cp.async`` double-buffered tiles).

Every query sees all ``P`` prefix keys (read from the prefix's own buffer, shared by the batch or
per row) and the sequence keys allowed by bottom-right causality and the key padding mask;
grouped-query heads read their kv head without copies. Backward (a dQ kernel, then a dK/dV kernel
that also covers the prefix keys) is deterministic: the prefix gradient is reduced over the batch
in a fixed order, without atomics.

Equivalent PyTorch (see lora_kernels.reference)::

    keys = cat([prefix_k.expand(B, ...), k], 2); values likewise; GQA by repeat_interleave
    out = softmax(q @ keys^T * scale + mask) @ values;  lse = logsumexp(scores, -1)
"""

from __future__ import annotations

import torch

from ..backends import Capabilities
from . import capability_reasons, dtype_name

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
SUPPORTED_HEAD_DIMS = (64, 128)
MAX_GRID_YZ = 65535
CAPABILITIES = Capabilities(devices=("cuda",), dtypes=SUPPORTED_DTYPES,
                            head_dims=SUPPORTED_HEAD_DIMS, dropout=False)



def not_supported_reasons(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, dropout_p,
                          training) -> list[str]:
    """Why the CUDA kernels cannot serve these inputs (empty list: they can)."""
    reasons: list[str] = []
    tensors = {"q": q, "k": k, "v": v}
    if prefix_k is not None:
        tensors["prefix_k"] = prefix_k
    if prefix_v is not None:
        tensors["prefix_v"] = prefix_v
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            return [f"{name} is not a tensor"]
    reasons += CAPABILITIES.reasons({"q": q}, head_dim=q.shape[-1],
                                    dropout=float(dropout_p) > 0.0 and training)
    reasons += capability_reasons(next(iter(tensors.values())).device)
    for name, t in tensors.items():
        if t.dtype != q.dtype:
            reasons.append(f"{name} dtype {dtype_name(t.dtype)} differs from q dtype {dtype_name(q.dtype)}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        reasons.append("q, k and v must be 4-D (B, H, L, D)")
        return reasons
    if q.shape[0] > MAX_GRID_YZ or q.shape[1] > MAX_GRID_YZ:
        reasons.append(f"batch {q.shape[0]} or heads {q.shape[1]} above {MAX_GRID_YZ}")
    if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
        reasons.append(f"key_padding_mask dtype {dtype_name(key_padding_mask.dtype)} is not bool")
    return reasons


def _as_4d(prefix: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    if prefix is None:
        return k.new_empty((1, k.shape[1], 0, q.shape[-1]))
    return prefix.unsqueeze(0) if prefix.dim() == 3 else prefix


def forward(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale):
    """``(out, lse)``: out (B, Hq, Lq, D) in q's dtype, lse (B, Hq, Lq) float32.

    q (B, Hq, Lq, D); k, v (B, Hkv, Lk, D); prefix_k/v (Bp, Hkv, P, D) with Bp in {1, B}
    (P may be 0); one dtype (fp16/bf16), any strides; key_padding_mask (B, Lk) bool (True =
    keep) or None; causal bool (bottom-right); scale float.
    """
    from . import ops

    pk, pv = _as_4d(prefix_k, q, k), _as_4d(prefix_v, q, v)
    return tuple(ops().prefix_attention_fwd(q, k, v, pk, pv, key_padding_mask, bool(causal),
                                            float(scale)))


def backward(dout, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, causal, scale):
    """``(dq, dk, dv, dprefix_k, dprefix_v)`` with the shapes and dtypes of the inputs."""
    from . import ops

    pk, pv = _as_4d(prefix_k, q, k), _as_4d(prefix_v, q, v)
    dq, dk, dv, dpk, dpv = ops().prefix_attention_bwd(
        dout, q, k, v, pk, pv, key_padding_mask, out, lse, bool(causal), float(scale)
    )
    if prefix_k is not None and prefix_k.dim() == 3:
        dpk, dpv = dpk.squeeze(0), dpv.squeeze(0)
    return dq, dk, dv, dpk, dpv


def register_fakes() -> None:
    """Fake (meta) implementations of the attention ops, so torch.compile can trace them."""

    @torch.library.register_fake("lora_kernels_cuda::prefix_attention_fwd")
    def _fwd(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale):
        out = q.new_empty(q.shape)
        lse = q.new_empty(q.shape[:3], dtype=torch.float32)
        return out, lse

    @torch.library.register_fake("lora_kernels_cuda::prefix_attention_bwd")
    def _bwd(dout, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, causal, scale):
        return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
                prefix_k.new_empty(prefix_k.shape), prefix_v.new_empty(prefix_v.shape))
