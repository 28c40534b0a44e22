"""Backward of prefix attention, FlashAttention-2 style, with no atomics.

Five matmuls per (query tile, key tile): S^T = K Q^T, dP^T = V dO^T, dV += P^T dO,
dK += dS^T Q here, and dQ += dS K in attention_dq.py from the dS this kernel stores
(input dtype: exactly the operand FA2 feeds its dQ matmul). When that dS workspace would be
too large (prefix_attention.DS_WORKSPACE_BYTES: long sequences, large batches) nothing is
stored and the dQ pass recomputes S and dP instead (seven matmuls, linear memory).

Launches: delta = rowsum(dO * O); then one dK/dV launch whose 1-D grid holds
  - first, the prefix programs, one per (prefix tile of width BLOCK_P, batch row, kv head):
    they loop over the group's query heads and every query tile, with the accumulators
    transposed (dK^T, dV^T: the head dim is the M side of the matmuls, so a 32-wide prefix
    tile still runs on wgmma); a shared prefix gets one fp32 partial per batch row, summed
    over the batch afterwards in a fixed order (deterministic, no atomics), a per-row prefix
    its own rows;
  - then the sequence programs, one per (key tile, batch row, kv head), looping over the
    group's query heads and the query tiles that see the key tile: the on-band tiles with the
    causal mask, the tiles below the band without masks, the ragged last query tile with row
    masks.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import attention_common as common
from .attention_common import LOG2E, dot, load_tile

DELTA_ROWS = 32


@triton.jit
def _delta_kernel(O, DO, DELTA, Hq, Lq, sob, soh, som, sod, sdb, sdh, sdm, sdd,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta[b, h, i] = sum_d dO * O in fp32, contiguous (B, Hq, Lq)."""
    pid = tl.program_id(0)
    n_m = tl.cdiv(Lq, BLOCK_M)
    bh = pid // n_m
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    offs_m = (pid % n_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < Lq)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :] * sdd,
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * Lq + offs_m, tl.sum(o * do, 1), mask=offs_m < Lq)


@triton.jit
def _row_stats(lse_ptr, delta_ptr, offs_m, m_ok, MASK_ROWS: tl.constexpr):
    """(LSE in base 2, delta) of a query tile; rows past Lq or that saw no key get +inf, so
    their probabilities are 0."""
    if MASK_ROWS:
        lse = tl.load(lse_ptr + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(delta_ptr + offs_m, mask=m_ok, other=0.0)
    else:
        lse = tl.load(lse_ptr + offs_m)
        delta = tl.load(delta_ptr + offs_m)
    return tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E, delta


@triton.jit
def _key_tile_steps(k, v, dk, dv, offs_n, n_ok, keep_n, q_ptr, do_ptr, lse_ptr, delta_ptr,
                    ds_ptr, first, n_tiles, G, Lq, diag, sqh, sqm, sqd, sdoh, sdom, sdod,
                    ds_rows, offs_d, d_ok, offs_dh, dh_ok, ds_now, qk_scale,
                    MASK_ROWS: tl.constexpr, CAUSAL_MASK: tl.constexpr, HAS_PAD: tl.constexpr,
                    STORE_DS: tl.constexpr, MASK_D: tl.constexpr, SPLIT_D: tl.constexpr,
                    DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr):
    """dK, dV of one key tile (k, v: (N, BLOCK_D)) from the query tiles first + j * BLOCK_M,
    j < n_tiles, of each of the G query heads of its group: one flat loop over (head, tile),
    pointers at the group's first head. Computed transposed (S^T, P^T, dS^T are (N, M));
    stores dS (M, N) when STORE_DS and ds_now. With SPLIT_D, dK and dV cover only the head
    dims offs_dh (S and dP still use all of them)."""
    offs_mb = tl.arange(0, BLOCK_M)
    for t in range(0, G * n_tiles):
        g = t // n_tiles
        offs_m = first + (t - g * n_tiles) * BLOCK_M + offs_mb
        m_ok = offs_m < Lq
        q = load_tile(q_ptr + g * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                      m_ok, d_ok, MASK_ROWS, MASK_D)
        do = load_tile(do_ptr + g * sdoh + offs_m[:, None] * sdom + offs_d[None, :] * sdod,
                       m_ok, d_ok, MASK_ROWS, MASK_D)
        if SPLIT_D:
            q_h = load_tile(q_ptr + g * sqh + offs_m[:, None] * sqm + offs_dh[None, :] * sqd,
                            m_ok, dh_ok, MASK_ROWS, MASK_D)
            do_h = load_tile(do_ptr + g * sdoh + offs_m[:, None] * sdom
                             + offs_dh[None, :] * sdod, m_ok, dh_ok, MASK_ROWS, MASK_D)
        else:
            q_h = q
            do_h = do
        lse2, delta = _row_stats(lse_ptr + g * Lq, delta_ptr + g * Lq, offs_m, m_ok, MASK_ROWS)
        p = tl.exp2(dot(k, tl.trans(q), DOT_FP32) * qk_scale - lse2[None, :])
        if CAUSAL_MASK:
            p = tl.where(offs_n[:, None] <= offs_m[None, :] + diag, p, 0.0)
        if HAS_PAD:
            p = tl.where(keep_n[:, None], p, 0.0)
        dv += dot(p.to(do.dtype), do_h, DOT_FP32)
        ds = p * (dot(v, tl.trans(do), DOT_FP32) - delta[None, :])
        dk += dot(ds.to(q.dtype), q_h, DOT_FP32)
        if STORE_DS:
            ds_head = ds_ptr + g.to(tl.int64) * Lq * ds_rows
            tl.store(ds_head + offs_m[None, :] * ds_rows + offs_n[:, None],
                     ds.to(ds_ptr.dtype.element_ty),
                     mask=n_ok[:, None] & m_ok[None, :] & ds_now)
    return dk, dv


@triton.jit
def _prefix_tile_steps(pk, pv, dkt, dvt, offs_p, p_ok, q_ptr, do_ptr, lse_ptr, delta_ptr,
                       ds_ptr, first, n_tiles, G, Lq, sqh, sqm, sqd, sdoh, sdom, sdod, ds_rows,
                       offs_d, d_ok, qk_scale, MASK_ROWS: tl.constexpr, STORE_DS: tl.constexpr,
                       MASK_D: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr,
                       STAGES: tl.constexpr):
    """dK^T, dV^T (BLOCK_D, BLOCK_P) of one prefix tile, over (head, query tile) as in
    _key_tile_steps (every query sees the prefix: no causal or padding mask). BLOCK_M is
    16 x num_warps (the M side of Q pk^T on wgmma, computed once); STAGES pipeline stages
    (fewer than the sequence loops': its tiles are larger)."""
    offs_mb = tl.arange(0, BLOCK_M)
    for t in tl.range(0, G * n_tiles, num_stages=STAGES):
        g = t // n_tiles
        offs_m = first + (t - g * n_tiles) * BLOCK_M + offs_mb
        m_ok = offs_m < Lq
        q = load_tile(q_ptr + g * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                      m_ok, d_ok, MASK_ROWS, MASK_D)
        do = load_tile(do_ptr + g * sdoh + offs_m[:, None] * sdom + offs_d[None, :] * sdod,
                       m_ok, d_ok, MASK_ROWS, MASK_D)
        lse2, delta = _row_stats(lse_ptr + g * Lq, delta_ptr + g * Lq, offs_m, m_ok, MASK_ROWS)
        p = tl.exp2(dot(q, tl.trans(pk), DOT_FP32) * qk_scale - lse2[:, None])  # (M, BLOCK_P)
        dvt += dot(tl.trans(do), p.to(do.dtype), DOT_FP32)
        ds = p * (dot(do, tl.trans(pv), DOT_FP32) - delta[:, None])
        dkt += dot(tl.trans(q), ds.to(q.dtype), DOT_FP32)
        if STORE_DS:
            ds_head = ds_ptr + g.to(tl.int64) * Lq * ds_rows
            tl.store(ds_head + offs_m[:, None] * ds_rows + offs_p[None, :],
                     ds.to(ds_ptr.dtype.element_ty), mask=m_ok[:, None] & p_ok[None, :])
    return dkt, dvt


@common.autotune("bwd_kv", key=["LQ_KEY", "LK_KEY", "P_KEY", "G", "BLOCK_D", "CAUSAL",
                                "HAS_PAD", "STORE_DS"])
@triton.jit
def _bwd_kv_kernel(
    Q, K, V, PK, PV, DO, LSE, DELTA, KPM, DK, DV, DPK, DPV, DS,
    B, Hq, Hkv, G, Lq, Lk, P, scale, ds_seq_col, ds_rows,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    spkb, spkh, spkn, spkd, spvb, spvh, spvn, spvd, sdob, sdoh, sdom, sdod, smb, smn,
    sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
    sdpkb, sdpkh, sdpkn, sdpkd, sdpvb, sdpvh, sdpvn, sdpvd,
    LQ_KEY, LK_KEY, P_KEY,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, STORE_DS: tl.constexpr,
    DOT_FP32: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_MP: tl.constexpr,
    PREFIX_STAGES: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DH: tl.constexpr,
):
    MASK_D: tl.constexpr = BLOCK_D != HEAD_DIM
    SPLIT_D: tl.constexpr = BLOCK_DH != BLOCK_D  # dK, dV by head-dim halves (D > 128)
    D_PARTS: tl.constexpr = BLOCK_D // BLOCK_DH
    pid = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    qk_scale = scale * LOG2E
    n_p = tl.cdiv(P, BLOCK_P)
    n_pre = n_p * B * Hkv
    if pid < n_pre:
        # ---- a prefix tile of one batch row and kv head
        bk = pid // n_p
        b = (bk // Hkv).to(tl.int64)
        hk = (bk % Hkv).to(tl.int64)
        offs_p = (pid % n_p) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_ok = offs_p < P
        pk = load_tile(PK + b * spkb + hk * spkh + offs_p[:, None] * spkn
                       + offs_d[None, :] * spkd, p_ok, d_ok, True, MASK_D)
        pv = load_tile(PV + b * spvb + hk * spvh + offs_p[:, None] * spvn
                       + offs_d[None, :] * spvd, p_ok, d_ok, True, MASK_D)
        dkt = tl.zeros([BLOCK_D, BLOCK_P], tl.float32)  # transposed: small, never split
        dvt = tl.zeros([BLOCK_D, BLOCK_P], tl.float32)
        h0 = hk * G  # the group's first query head
        row = (b * Hq + h0) * Lq
        q_ptr = Q + b * sqb + h0 * sqh
        do_ptr = DO + b * sdob + h0 * sdoh
        ds_ptr = DS + row * ds_rows
        n_full = Lq // BLOCK_MP
        dkt, dvt = _prefix_tile_steps(
            pk, pv, dkt, dvt, offs_p, p_ok, q_ptr, do_ptr, LSE + row, DELTA + row, ds_ptr,
            0, n_full, G, Lq, sqh, sqm, sqd, sdoh, sdom, sdod, ds_rows, offs_d, d_ok, qk_scale,
            False, STORE_DS, MASK_D, DOT_FP32, BLOCK_MP, PREFIX_STAGES)
        dkt, dvt = _prefix_tile_steps(
            pk, pv, dkt, dvt, offs_p, p_ok, q_ptr, do_ptr, LSE + row, DELTA + row, ds_ptr,
            n_full * BLOCK_MP, tl.cdiv(Lq, BLOCK_MP) - n_full, G, Lq, sqh, sqm, sqd, sdoh,
            sdom, sdod, ds_rows, offs_d, d_ok, qk_scale, True, STORE_DS, MASK_D, DOT_FP32,
            BLOCK_MP, PREFIX_STAGES)
        mask_t = d_ok[:, None] & p_ok[None, :]
        tl.store(DPK + b * sdpkb + hk * sdpkh + offs_p[None, :] * sdpkn + offs_d[:, None] * sdpkd,
                 (dkt * scale).to(DPK.dtype.element_ty), mask=mask_t)
        tl.store(DPV + b * sdpvb + hk * sdpvh + offs_p[None, :] * sdpvn + offs_d[:, None] * sdpvd,
                 dvt.to(DPV.dtype.element_ty), mask=mask_t)
    else:
        # ---- a sequence key tile of one batch row and kv head (a part of the head dim)
        pid_s = pid - n_pre
        part = pid_s % D_PARTS
        pid_s = pid_s // D_PARTS
        offs_dh = part * BLOCK_DH + tl.arange(0, BLOCK_DH)
        dh_ok = offs_dh < HEAD_DIM
        ds_now = part == 0  # one part stores dS
        n_n = tl.cdiv(Lk, BLOCK_N)
        nb = pid_s % n_n
        bk = pid_s // n_n
        b = (bk // Hkv).to(tl.int64)
        hk = (bk % Hkv).to(tl.int64)
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Lk
        k = load_tile(K + b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                      n_ok, d_ok, True, MASK_D)
        v = load_tile(V + b * svb + hk * svh + offs_n[:, None] * svn + offs_d[None, :] * svd,
                      n_ok, d_ok, True, MASK_D)
        keep_n = n_ok
        if HAS_PAD:
            keep_n = tl.load(KPM + b * smb + offs_n * smn, mask=n_ok, other=0) != 0
        dk = tl.zeros([BLOCK_N, BLOCK_DH], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_DH], tl.float32)
        diag = Lk - Lq  # query i sees key j iff j <= i + diag
        row_full = Lq // BLOCK_M * BLOCK_M
        if CAUSAL:  # first query tile that sees the key tile; first that sees all of it
            lo = tl.maximum(nb * BLOCK_N - diag, 0) // BLOCK_M * BLOCK_M
            full_lo = tl.cdiv(tl.maximum(nb * BLOCK_N + BLOCK_N - 1 - diag, 0), BLOCK_M) * BLOCK_M
        else:
            lo = nb * 0
            full_lo = nb * 0
        mid = tl.minimum(tl.maximum(full_lo, lo), row_full)
        tail = tl.maximum(row_full, lo)
        h0 = hk * G  # the group's first query head
        row = (b * Hq + h0) * Lq
        q_ptr = Q + b * sqb + h0 * sqh
        do_ptr = DO + b * sdob + h0 * sdoh
        ds_ptr = DS + row * ds_rows + ds_seq_col
        # on the causal band: masked; below it: no masks; the ragged last query tile
        dk, dv = _key_tile_steps(
            k, v, dk, dv, offs_n, n_ok, keep_n, q_ptr, do_ptr, LSE + row, DELTA + row, ds_ptr,
            lo, (mid - lo) // BLOCK_M, G, Lq, diag, sqh, sqm, sqd, sdoh, sdom, sdod, ds_rows,
            offs_d, d_ok, offs_dh, dh_ok, ds_now, qk_scale, False, CAUSAL, HAS_PAD, STORE_DS,
            MASK_D, SPLIT_D, DOT_FP32, BLOCK_M)
        dk, dv = _key_tile_steps(
            k, v, dk, dv, offs_n, n_ok, keep_n, q_ptr, do_ptr, LSE + row, DELTA + row, ds_ptr,
            mid, (row_full - mid) // BLOCK_M, G, Lq, diag, sqh, sqm, sqd, sdoh, sdom, sdod,
            ds_rows, offs_d, d_ok, offs_dh, dh_ok, ds_now, qk_scale, False, False, HAS_PAD,
            STORE_DS, MASK_D, SPLIT_D, DOT_FP32, BLOCK_M)
        dk, dv = _key_tile_steps(
            k, v, dk, dv, offs_n, n_ok, keep_n, q_ptr, do_ptr, LSE + row, DELTA + row, ds_ptr,
            tail, tl.cdiv(Lq - tail, BLOCK_M), G, Lq, diag, sqh, sqm, sqd, sdoh, sdom, sdod,
            ds_rows, offs_d, d_ok, offs_dh, dh_ok, ds_now, qk_scale, True, CAUSAL, HAS_PAD,
            STORE_DS, MASK_D, SPLIT_D, DOT_FP32, BLOCK_M)
        mask = n_ok[:, None] & dh_ok[None, :]
        tl.store(DK + b * sdkb + hk * sdkh + offs_n[:, None] * sdkn + offs_dh[None, :] * sdkd,
                 (dk * scale).to(DK.dtype.element_ty), mask=mask)
        tl.store(DV + b * sdvb + hk * sdvh + offs_n[:, None] * sdvn + offs_dh[None, :] * sdvd,
                 dv.to(DV.dtype.element_ty), mask=mask)
