"""The Triton backend of prefix_attention (the backend contract of the package: `forward`,
`backward`, `not_supported_reasons`), after FlashAttention-2 and Triton's fused-attention
tutorial (own code). This module plans and launches; the kernels live in

- attention_forward.py: forward for Lq > 16 (prefix tile of its own width, unmasked tiles
  below the causal band, masked ones on it);
- attention_decode.py: forward for Lq <= 16 (query heads of a kv head packed in one tile,
  split-K over the keys with a deterministic LSE merge);
- attention_backward.py: delta, then dK/dV with the prefix gradient in the same launch
  (5-matmul backward, dS stored for dQ); attention_dq.py: dQ.

Layout: q (B, Hq, Lq, D); k, v (B, Hkv, Lk, D); prefix_k/v (Bp, Hkv, P, D) with Bp in {1, B}
(a shared prefix is read with batch stride 0, never expanded); key_padding_mask (B, Lk) bool.
Query head h reads kv head h // (Hq // Hkv). Any strides. Causal is bottom-right: query i sees
key j iff j <= i + Lk - Lq; every query sees the prefix. Dots accumulate in fp32; fp32 inputs
use IEEE fp32 dots (tf32 would miss the tolerance rule). Every launch is on the inputs' device,
with a 1-D grid, and no kernel uses atomics: results are deterministic.
"""

from __future__ import annotations

import math

import torch
import triton

from ..backends import Capabilities
from . import attention_common as common
from .attention_backward import DELTA_ROWS, _bwd_kv_kernel, _delta_kernel
from .attention_decode import forward_decode
from .attention_dq import _dq_kernel, _dq_recompute_kernel, dq_grid
from .attention_forward import forward_prefill

DECODE_MAX_LQ = 16  # forward of at most this many queries takes the decode kernel
# Largest dS workspace (bytes) the backward allocates; above it dQ recomputes S and dP.
DS_WORKSPACE_BYTES = 1 << 30


CAPABILITIES = Capabilities(devices=("cuda", "cpu"),
                            dtypes=(torch.float32, torch.float16, torch.bfloat16),
                            max_head_dim=256, dropout=False)


def not_supported_reasons(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, dropout_p,
                          training) -> list[str]:
    """Why these kernels cannot serve the inputs (empty: they can)."""
    return CAPABILITIES.reasons({"q": q}, head_dim=q.shape[-1], dropout=dropout_p > 0 and training)


def forward(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale):
    """q (B, Hq, Lq, D); k, v (B, Hkv, Lk, D); prefix_k/v (Bp, Hkv, P, D) or None;
    key_padding_mask (B, Lk) bool or None -> (out (B, Hq, Lq, D) q.dtype, lse (B, Hq, Lq) fp32;
    a row that sees no key gets 0 and -inf)."""
    B, Hq, Lq, D = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(-math.inf)
    prefix = common.Prefix(prefix_k, prefix_v, q)
    padding = common.Padding(key_padding_mask, q)
    run = forward_decode if Lq <= DECODE_MAX_LQ else forward_prefill
    with common.device_guard(q):
        run(q, k, v, prefix, padding, causal, scale, out, lse)
    return out, lse


def ds_workspace(B: int, Hq: int, Lq: int, Lk: int, P: int, dtype: torch.dtype
                 ) -> tuple[int, int, int]:
    """(bytes, column of the first sequence key, row length) of the dS workspace
    (B, Hq, Lq, row length): the prefix columns, then the sequence's, each start 16-aligned."""
    seq_col = triton.cdiv(P, 16) * 16
    width = seq_col + triton.cdiv(Lk, 16) * 16
    return B * Hq * Lq * width * torch.empty((), dtype=dtype).element_size(), seq_col, width


def backward(dout, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, causal, scale):
    """Gradients (dq, dk, dv, dprefix_k, dprefix_v) in the inputs' shapes and dtypes
    (dprefix (Bp, Hkv, P, D), None when there is no prefix)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    if q.numel() == 0:  # no query: nothing flows back, and no kernel runs to say so
        zeros = [None if t is None else torch.zeros(t.shape, dtype=t.dtype, device=t.device)
                 for t in (q, k, v, prefix_k, prefix_v)]
        return tuple(zeros)
    prefix = common.Prefix(prefix_k, prefix_v, q)
    padding = common.Padding(key_padding_mask, q)
    P = prefix.P
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=q.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=q.device)
    dpk = dpv = None
    if prefix_k is not None:
        dpk = torch.empty(prefix_k.shape, dtype=prefix_k.dtype, device=q.device)
        dpv = torch.empty(prefix_v.shape, dtype=prefix_v.dtype, device=q.device)
    # a prefix shared by B > 1 rows: one fp32 partial per row, summed below in a fixed order
    partial = prefix.present and prefix.shared and B > 1
    if partial:
        dpk_x = torch.empty((B, Hkv, P, D), dtype=torch.float32, device=q.device)
        dpv_x = torch.empty_like(dpk_x)
    elif prefix.present:
        dpk_x, dpv_x = dpk, dpv
    else:
        dpk_x = dpv_x = dq  # not written: no prefix programs
    lse = lse.to(torch.float32).contiguous()
    delta = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
    ds_bytes, ds_seq_col, ds_rows = ds_workspace(B, Hq, Lq, Lk, P, q.dtype)
    store_ds = ds_bytes <= DS_WORKSPACE_BYTES
    ds = torch.empty(ds_bytes // q.element_size(), dtype=q.dtype, device=q.device) \
        if store_ds else dq
    block_d = common.block_d(D)
    keys = (common.bucket(Lq), common.bucket(Lk), common.bucket(P))
    flags = dict(DOT_FP32=common.dot_fp32(q.dtype), HEAD_DIM=D, BLOCK_D=block_d)
    with common.device_guard(q):
        common.launch(
            _delta_kernel, (B * Hq * triton.cdiv(Lq, DELTA_ROWS),),
            out, dout, delta, Hq, Lq, *out.stride(), *dout.stride(),
            HEAD_DIM=D, BLOCK_M=DELTA_ROWS, BLOCK_D=block_d,
        )
        n_prefix = triton.cdiv(P, prefix.block) * B * Hkv
        block_dh = min(block_d, common.MAX_GRAD_TILE_D)  # dK, dV by parts of the head dim
        parts = block_d // block_dh
        grid = lambda meta: (n_prefix + triton.cdiv(Lk, meta["BLOCK_N"]) * B * Hkv * parts,)
        common.launch(
            _bwd_kv_kernel, grid,
            q, k, v, prefix.k, prefix.v, dout, lse, delta, padding.mask, dk, dv, dpk_x, dpv_x,
            ds, B, Hq, Hkv, G, Lq, Lk, P, float(scale), ds_seq_col, ds_rows,
            *q.stride(), *k.stride(), *v.stride(), *prefix.k_strides, *prefix.v_strides,
            *dout.stride(), *padding.strides, *dk.stride(), *dv.stride(),
            *dpk_x.stride(), *dpv_x.stride(), *keys,
            CAUSAL=bool(causal), HAS_PAD=padding.present, STORE_DS=store_ds,
            BLOCK_P=prefix.block, BLOCK_DH=block_dh, **flags,
        )
        if store_ds:
            common.launch(
                _dq_kernel, dq_grid(B, Hq, Lq),
                ds, k, prefix.k, dq, Hq, G, Lq, Lk, P, float(scale), ds_seq_col, ds_rows,
                *k.stride(), *prefix.k_strides, *dq.stride(), *keys,
                CAUSAL=bool(causal), BLOCK_P=prefix.block, **flags,
            )
        else:
            common.launch(
                _dq_recompute_kernel, dq_grid(B, Hq, Lq),
                q, k, v, prefix.k, prefix.v, padding.mask, dout, lse, delta, dq,
                Hq, G, Lq, Lk, P, float(scale),
                *q.stride(), *k.stride(), *v.stride(), *prefix.k_strides, *prefix.v_strides,
                *padding.strides, *dout.stride(), *dq.stride(), *keys,
                CAUSAL=bool(causal), HAS_PAD=padding.present, BLOCK_P=prefix.block, **flags,
            )
    if partial:
        dpk.copy_(dpk_x.sum(0, keepdim=True))
        dpv.copy_(dpv_x.sum(0, keepdim=True))
    return dq, dk, dv, dpk, dpv
