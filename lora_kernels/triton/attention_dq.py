"""dQ of prefix attention: one program per (batch, query head, query tile), 1-D grid, tiles
of a head in descending order (the longest causal ones start first). Two kernels:

- `_dq_kernel`: dQ = scale * dS [K_prefix; K] from the dS the dK/dV kernel stored
  (attention_backward.py): one matmul per key tile, no exponentials; reads dS once.
- `_dq_recompute_kernel`: when no dS was stored, recomputes S = Q K^T and dP = dO V^T per key
  tile (three matmuls), FlashAttention-2's separate dQ pass.

Both walk the prefix in tiles of its own width, then the sequence tiles below the causal band
without masks, then the band with masks.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import attention_common as common
from .attention_common import LOG2E, dot, load_tile, store_tile


@triton.jit
def _ds_steps(dq, ds_ptr, k_ptr, lo, hi, n_limit, last_key, m_ok, offs_m, ds_rows,
              skn, skd, offs_d, d_ok, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
              MASK_D: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_N: tl.constexpr):
    """dq += dS[:, tile] @ K[tile] over the key tiles [lo, hi). Off the band every stored
    entry is read; on it only the visible ones (the rest may never have been written)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < n_limit
        ds_ptrs = ds_ptr + offs_m[:, None] * ds_rows + cols[None, :]
        if MASKED:
            keep = m_ok[:, None] & col_ok[None, :]
            if CAUSAL:
                keep = keep & (cols[None, :] <= last_key[:, None])
            ds = tl.load(ds_ptrs, mask=keep, other=0.0)
        else:
            ds = tl.load(ds_ptrs, mask=m_ok[:, None], other=0.0)
        k = load_tile(k_ptr + cols[:, None] * skn + offs_d[None, :] * skd, col_ok, d_ok,
                      MASKED, MASK_D)
        dq += dot(ds.to(k.dtype), k, DOT_FP32)
    return dq


@common.autotune("bwd_dq", key=["LQ_KEY", "LK_KEY", "P_KEY", "BLOCK_D", "CAUSAL"])
@triton.jit
def _dq_kernel(
    DS, K, PK, DQ, Hq, G, Lq, Lk, P, scale, ds_seq_col, ds_rows,
    skb, skh, skn, skd, spkb, spkh, spkn, spkd, sdqb, sdqh, sdqm, sdqd,
    LQ_KEY, LK_KEY, P_KEY,
    CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    MASK_D: tl.constexpr = BLOCK_D != HEAD_DIM
    pid = tl.program_id(0)
    n_m = tl.cdiv(Lq, BLOCK_M)
    bh = pid // n_m
    mb = n_m - 1 - pid % n_m
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    hk = h // G
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < Lq
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    diag = Lk - Lq
    last_key = offs_m + diag
    ds_ptr = DS + bh.to(tl.int64) * Lq * ds_rows
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    pk_ptr = PK + b * spkb + hk * spkh
    p_full = P // BLOCK_P * BLOCK_P
    dq = _ds_steps(dq, ds_ptr, pk_ptr, 0, p_full, P, last_key, m_ok, offs_m, ds_rows,
                   spkn, spkd, offs_d, d_ok, False, False, MASK_D, DOT_FP32, BLOCK_P)
    dq = _ds_steps(dq, ds_ptr, pk_ptr, p_full, P, P, last_key, m_ok, offs_m, ds_rows,
                   spkn, spkd, offs_d, d_ok, True, False, MASK_D, DOT_FP32, BLOCK_P)
    if CAUSAL:
        hi = tl.minimum(Lk, tl.minimum(mb * BLOCK_M + BLOCK_M, Lq) + diag)
        full = tl.minimum(mb * BLOCK_M + diag + 1, Lk) // BLOCK_N * BLOCK_N
    else:
        hi = Lk
        full = Lk // BLOCK_N * BLOCK_N
    k_ptr = K + b * skb + hk * skh
    ds_ptr += ds_seq_col
    dq = _ds_steps(dq, ds_ptr, k_ptr, 0, full, Lk, last_key, m_ok, offs_m, ds_rows,
                   skn, skd, offs_d, d_ok, False, False, MASK_D, DOT_FP32, BLOCK_N)
    dq = _ds_steps(dq, ds_ptr, k_ptr, full, hi, Lk, last_key, m_ok, offs_m, ds_rows,
                   skn, skd, offs_d, d_ok, True, CAUSAL, MASK_D, DOT_FP32, BLOCK_N)
    store_tile(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :] * sdqd,
               (dq * scale).to(DQ.dtype.element_ty), m_ok, d_ok, True, MASK_D)


@triton.jit
def _recompute_steps(dq, q, do, lse2, delta, k_ptr, v_ptr, kpm_ptr, lo, hi, n_limit,
                     last_key, skn, skd, svn, svd, smn, offs_d, d_ok, qk_scale,
                     MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr,
                     MASK_D: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_N: tl.constexpr):
    """dq += dS @ K over the key tiles [lo, hi), dS from recomputed S and dP."""
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < n_limit
        k = load_tile(k_ptr + cols[:, None] * skn + offs_d[None, :] * skd, col_ok, d_ok,
                      MASKED, MASK_D)
        v = load_tile(v_ptr + cols[:, None] * svn + offs_d[None, :] * svd, col_ok, d_ok,
                      MASKED, MASK_D)
        p = tl.exp2(dot(q, tl.trans(k), DOT_FP32) * qk_scale - lse2[:, None])
        if MASKED or HAS_PAD:
            keep = col_ok
            if HAS_PAD:
                keep = keep & (tl.load(kpm_ptr + cols * smn, mask=col_ok, other=0) != 0)
            keep2 = keep[None, :]
            if CAUSAL:
                keep2 = keep2 & (cols[None, :] <= last_key[:, None])
            p = tl.where(keep2, p, 0.0)
        ds = p * (dot(do, tl.trans(v), DOT_FP32) - delta[:, None])
        dq += dot(ds.to(k.dtype), k, DOT_FP32)
    return dq


@common.autotune("bwd_dq_recompute", key=["LQ_KEY", "LK_KEY", "P_KEY", "G", "BLOCK_D",
                                          "CAUSAL", "HAS_PAD"])
@triton.jit
def _dq_recompute_kernel(
    Q, K, V, PK, PV, KPM, DO, LSE, DELTA, DQ,
    Hq, G, Lq, Lk, P, scale,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    spkb, spkh, spkn, spkd, spvb, spvh, spvn, spvd, smb, smn,
    sdob, sdoh, sdom, sdod, sdqb, sdqh, sdqm, sdqd,
    LQ_KEY, LK_KEY, P_KEY,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, DOT_FP32: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    MASK_D: tl.constexpr = BLOCK_D != HEAD_DIM
    pid = tl.program_id(0)
    n_m = tl.cdiv(Lq, BLOCK_M)
    bh = pid // n_m
    mb = n_m - 1 - pid % n_m
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    hk = h // G
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < Lq
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = load_tile(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                  m_ok, d_ok, True, MASK_D)
    do = load_tile(DO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_d[None, :] * sdod,
                   m_ok, d_ok, True, MASK_D)
    row = bh.to(tl.int64) * Lq + offs_m
    lse = tl.load(LSE + row, mask=m_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E
    delta = tl.load(DELTA + row, mask=m_ok, other=0.0)
    qk_scale = scale * LOG2E
    diag = Lk - Lq
    last_key = offs_m + diag
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    pk_ptr = PK + b * spkb + hk * spkh
    pv_ptr = PV + b * spvb + hk * spvh
    p_full = P // BLOCK_P * BLOCK_P
    dq = _recompute_steps(dq, q, do, lse2, delta, pk_ptr, pv_ptr, KPM, 0, p_full, P, last_key,
                          spkn, spkd, spvn, spvd, 0, offs_d, d_ok, qk_scale,
                          False, False, False, MASK_D, DOT_FP32, BLOCK_P)
    dq = _recompute_steps(dq, q, do, lse2, delta, pk_ptr, pv_ptr, KPM, p_full, P, P, last_key,
                          spkn, spkd, spvn, spvd, 0, offs_d, d_ok, qk_scale,
                          True, False, False, MASK_D, DOT_FP32, BLOCK_P)
    if CAUSAL:
        hi = tl.minimum(Lk, tl.minimum(mb * BLOCK_M + BLOCK_M, Lq) + diag)
        full = tl.minimum(mb * BLOCK_M + diag + 1, Lk) // BLOCK_N * BLOCK_N
    else:
        hi = Lk
        full = Lk // BLOCK_N * BLOCK_N
    k_ptr = K + b * skb + hk * skh
    v_ptr = V + b * svb + hk * svh
    kpm_ptr = KPM + b * smb
    dq = _recompute_steps(dq, q, do, lse2, delta, k_ptr, v_ptr, kpm_ptr, 0, full, Lk, last_key,
                          skn, skd, svn, svd, smn, offs_d, d_ok, qk_scale,
                          False, False, HAS_PAD, MASK_D, DOT_FP32, BLOCK_N)
    dq = _recompute_steps(dq, q, do, lse2, delta, k_ptr, v_ptr, kpm_ptr, full, hi, Lk,
                          last_key, skn, skd, svn, svd, smn, offs_d, d_ok, qk_scale,
                          True, CAUSAL, HAS_PAD, MASK_D, DOT_FP32, BLOCK_N)
    store_tile(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :] * sdqd,
               (dq * scale).to(DQ.dtype.element_ty), m_ok, d_ok, True, MASK_D)


def dq_grid(B: int, Hq: int, Lq: int):
    return lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]) * B * Hq,)
