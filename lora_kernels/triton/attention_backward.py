"""Backward of prefix attention, FlashAttention-2 style, with no atomics.

Five matmuls per (query tile, key tile): S^T = K Q^T, dP^T = V dO^T, dV += P^T dO,
dK += dS^T Q here, and dQ += dS K in attention_dq.py from the dS this kernel stores
(input dtype: exactly the operand FA2 feeds its dQ matmul). The dS workspace is bounded
(prefix_attention.DS_WORKSPACE_BYTES): the launcher runs this kernel and dQ over slices of
the (batch row, kv head) groups, and of their query rows when one group's dS is larger than
the budget; a slice of rows adds to the fp32 dK, dV (and prefix) partials of the slices
before it (ACC_IN) and leaves them for the next (ACC_OUT), in row order: deterministic; the
launcher scales and casts the last slice's sums (a scaled 16-bit store in the last slice spilled
in one config). Only where prefix_attention.DS_MIN_SLICE_ROWS query rows x heads of one group
exceed the budget (about 130 k keys) is nothing stored, and the dQ pass recomputes S and dP
(seven matmuls).

Launches: delta = rowsum(dO * O); then per slice one dK/dV launch whose 1-D grid holds
  - first, the prefix programs, one per (prefix tile of width BLOCK_P, group of the slice,
    part of the head dim: halves at D > 128, S and dP over all of it, dS stored by one):
    they loop over the group's query heads and the slice's query tiles, with the accumulators
    transposed (dK^T, dV^T: the head dim is the M side of the matmuls, so a 32-wide prefix
    tile still runs on wgmma); a shared prefix gets one fp32 partial per batch row, summed
    over the batch afterwards in a fixed order (deterministic, no atomics), a per-row prefix
    its own rows;
  - then the sequence programs, one per (key tile, group of the slice, part of the head dim),
    looping over the group's query heads and the slice's query tiles that see the key tile:
    the on-band tiles with the causal mask, the tiles below the band without masks, the
    ragged last query tile with row masks.
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
def _key_tile_steps(k, v, dk, dv, offs_n, ds_n_ok, keep_n, q_ptr, do_ptr, lse_ptr, delta_ptr,
                    ds_ptr, first, n_tiles, G, Lq, diag, sqh, sqm, sqd, sdoh, sdom, sdod,
                    ds_rows, ds_head_stride, offs_d, d_ok, offs_dh, dh_ok, ds_now, qk_scale,
                    MASK_ROWS: tl.constexpr, CAUSAL_MASK: tl.constexpr, HAS_PAD: tl.constexpr,
                    STORE_DS: tl.constexpr, MASK_D: tl.constexpr, SPLIT_D: tl.constexpr,
                    DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr):
    """dK, dV of one key tile (k, v: (N, BLOCK_D)) from the query tiles first + j * BLOCK_M,
    j < n_tiles, of each of the G query heads of its group: one flat loop over (head, tile),
    pointers at the group's first head. Computed transposed (S^T, P^T, dS^T are (N, M));
    stores dS (M, N) where ds_n_ok when STORE_DS and ds_now: ds_ptr is row ``first`` of the
    first head, heads ds_head_stride apart, int32 offsets (the workspace is < 2^31
    elements). With SPLIT_D, dK and dV cover only the head dims offs_dh (S and dP still use all
    of them)."""
    offs_mb = tl.arange(0, BLOCK_M)
    for t in range(0, G * n_tiles):
        g = t // n_tiles
        rel_m = (t - g * n_tiles) * BLOCK_M + offs_mb
        offs_m = first + rel_m
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
            tl.store(ds_ptr + g * ds_head_stride + rel_m[None, :] * ds_rows + offs_n[:, None],
                     ds.to(ds_ptr.dtype.element_ty),
                     mask=ds_n_ok[:, None] & m_ok[None, :] & ds_now)
    return dk, dv


@triton.jit
def _chunked_dot_t(a_ptr, sam, sad, offs_m, m_ok, b_ptr, sbn, sbd, offs_n, n_ok,
                   HEAD_DIM: tl.constexpr, MASK_ROWS: tl.constexpr, DOT_FP32: tl.constexpr,
                   BLOCK_C: tl.constexpr):
    """a @ b^T (M, N) over the head dim in chunks of BLOCK_C, each chunk of a (M, BLOCK_C) and
    b (N, BLOCK_C) loaded just before its product: no whole (M, D) tile is live at once."""
    acc = tl.zeros([offs_m.shape[0], offs_n.shape[0]], tl.float32)
    offs_c = tl.arange(0, BLOCK_C)
    for c in tl.static_range(0, HEAD_DIM, BLOCK_C):
        cols = c + offs_c
        c_ok = cols < HEAD_DIM
        a = load_tile(a_ptr + offs_m[:, None] * sam + cols[None, :] * sad, m_ok, c_ok,
                      MASK_ROWS, c + BLOCK_C > HEAD_DIM)
        b = load_tile(b_ptr + offs_n[:, None] * sbn + cols[None, :] * sbd, n_ok, c_ok, True,
                      c + BLOCK_C > HEAD_DIM)
        acc += dot(a, tl.trans(b), DOT_FP32)
    return acc


@triton.jit
def _prefix_tile_steps(pk, pv, pk_ptr, pv_ptr, spkn, spkd, spvn, spvd, dkt, dvt, offs_p, p_ok,
                       q_ptr, do_ptr, lse_ptr, delta_ptr, ds_ptr, first, n_tiles, G, Lq, sqh,
                       sqm, sqd, sdoh, sdom, sdod, ds_rows, ds_head_stride, offs_d, d_ok,
                       offs_dh, dh_ok, ds_now, qk_scale, MASK_ROWS: tl.constexpr,
                       STORE_DS: tl.constexpr, MASK_D: tl.constexpr, SPLIT_D: tl.constexpr,
                       DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, STAGES: tl.constexpr,
                       HEAD_DIM: tl.constexpr, BLOCK_C: tl.constexpr):
    """dK^T, dV^T (BLOCK_DH, BLOCK_P) of one prefix tile, over (head, query tile) as in
    _key_tile_steps (every query sees the prefix: no causal or padding mask). BLOCK_M is
    16 x num_warps (the M side of Q pk^T on wgmma, computed once); STAGES pipeline stages
    (fewer than the sequence loops': its tiles are larger). With SPLIT_D, the head dims
    offs_dh only, as there, and the scores by chunks of BLOCK_C from pk_ptr, pv_ptr (pk, pv
    unused)."""
    offs_mb = tl.arange(0, BLOCK_M)
    for t in tl.range(0, G * n_tiles, num_stages=STAGES):
        g = t // n_tiles
        rel_m = (t - g * n_tiles) * BLOCK_M + offs_mb
        offs_m = first + rel_m
        m_ok = offs_m < Lq
        lse2, delta = _row_stats(lse_ptr + g * Lq, delta_ptr + g * Lq, offs_m, m_ok, MASK_ROWS)
        if SPLIT_D:  # Q pk^T, dO pv^T by head-dim chunks (whole tiles spilled), then halves
            s = _chunked_dot_t(q_ptr + g * sqh, sqm, sqd, offs_m, m_ok, pk_ptr, spkn, spkd,
                               offs_p, p_ok, HEAD_DIM, MASK_ROWS, DOT_FP32, BLOCK_C)
            dp = _chunked_dot_t(do_ptr + g * sdoh, sdom, sdod, offs_m, m_ok, pv_ptr, spvn,
                                spvd, offs_p, p_ok, HEAD_DIM, MASK_ROWS, DOT_FP32, BLOCK_C)
            q_h = load_tile(q_ptr + g * sqh + offs_m[:, None] * sqm + offs_dh[None, :] * sqd,
                            m_ok, dh_ok, MASK_ROWS, MASK_D)
            do_h = load_tile(do_ptr + g * sdoh + offs_m[:, None] * sdom
                             + offs_dh[None, :] * sdod, m_ok, dh_ok, MASK_ROWS, MASK_D)
        else:
            q_h = load_tile(q_ptr + g * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                            m_ok, d_ok, MASK_ROWS, MASK_D)
            do_h = load_tile(do_ptr + g * sdoh + offs_m[:, None] * sdom
                             + offs_d[None, :] * sdod, m_ok, d_ok, MASK_ROWS, MASK_D)
            s = dot(q_h, tl.trans(pk), DOT_FP32)
            dp = dot(do_h, tl.trans(pv), DOT_FP32)
        p = tl.exp2(s * qk_scale - lse2[:, None])  # (M, BLOCK_P)
        dvt += dot(tl.trans(do_h), p.to(do_h.dtype), DOT_FP32)
        ds = p * (dp - delta[:, None])
        dkt += dot(tl.trans(q_h), ds.to(q_h.dtype), DOT_FP32)
        if STORE_DS:
            tl.store(ds_ptr + g * ds_head_stride + rel_m[:, None] * ds_rows + offs_p[None, :],
                     ds.to(ds_ptr.dtype.element_ty),
                     mask=m_ok[:, None] & p_ok[None, :] & ds_now)
    return dkt, dvt


@triton.jit
def _start(acc, rows, cols, s_row, s_col, mask, seen, ACC_IN: tl.constexpr):
    """A gradient accumulator (fp32, (rows, cols)): the partial of the row slices before at
    ``acc`` (ACC_IN, where ``seen``: they saw the tile), else zeros. Loaded first, into the
    accumulator's own registers. The strides are compile-time constants here and run-time
    values in _finish, so that the compiler does not keep one tile of pointers alive across
    the loops for both (it spilled)."""
    if ACC_IN:
        ptrs = acc + rows[:, None] * s_row + cols[None, :] * s_col
        return tl.load(ptrs, mask=mask & seen, other=0.0)
    else:
        return tl.zeros([rows.shape[0], cols.shape[0]], tl.float32)


@triton.jit
def _finish(out, acc, x, rows, cols, s_row, s_col, acc_s_row, acc_s_col, mask, scale,
            ACC_OUT: tl.constexpr):
    """Store a gradient accumulator ``x`` (rows, cols): as it is to ``acc`` (fp32) for the row
    slices after (ACC_OUT), else times ``scale`` to ``out`` in its dtype."""
    if ACC_OUT:
        tl.store(acc + rows[:, None] * acc_s_row + cols[None, :] * acc_s_col, x, mask=mask)
    else:
        tl.store(out + rows[:, None] * s_row + cols[None, :] * s_col,
                 (x * scale).to(out.dtype.element_ty), mask=mask)


@common.autotune("bwd_kv", key=["LQ_KEY", "LK_KEY", "P_KEY", "G", "BLOCK_D", "CAUSAL",
                                "HAS_PAD", "STORE_DS"],
                 restore=["DK_ACC", "DV_ACC", "DPK", "DPV"])
@triton.jit(do_not_specialize=["group0", "n_groups", "row0", "row1", "n_keys"])  # 1 compile
def _bwd_kv_kernel(
    Q, K, V, PK, PV, DO, LSE, DELTA, KPM, DK, DV, DPK, DPV, DK_ACC, DV_ACC, DS,
    group0, n_groups, row0, row1, n_keys, Hq, Hkv, G, Lq, Lk, P, scale, ds_seq_col, ds_rows,
    ds_head_stride, acc_stride,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    spkb, spkh, spkn, spkd, spvb, spvh, spvn, spvd, sdob, sdoh, sdom, sdod, smb, smn,
    sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
    sdpkb, sdpkh, sdpkn, sdpkd, sdpvb, sdpvh, sdpvn, sdpvd,
    LQ_KEY, LK_KEY, P_KEY,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, STORE_DS: tl.constexpr,
    ACC_IN: tl.constexpr, ACC_OUT: tl.constexpr,
    DOT_FP32: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_MP: tl.constexpr,
    PREFIX_STAGES: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DH: tl.constexpr,
):
    """One slice: the groups group0 + [0, n_groups) (group = batch row * Hkv + kv head),
    query rows [row0, row1) (multiples of every query tile, but row1 = Lq), which see the
    first n_keys sequence keys. dS of the slice in DS: group - group0, head (ds_head_stride
    apart), row - row0 (ds_rows apart), column. DK_ACC, DV_ACC: fp32 (B * Hkv, Lk, HEAD_DIM)
    unscaled partials of the row slices (ACC_IN, ACC_OUT; acc_stride = HEAD_DIM); the
    prefix's are DPK, DPV themselves (fp32 and contiguous whenever rows are sliced)."""
    MASK_D: tl.constexpr = BLOCK_D != HEAD_DIM
    SPLIT_D: tl.constexpr = BLOCK_DH != BLOCK_D  # dK, dV by head-dim halves (D > 128)
    D_PARTS: tl.constexpr = BLOCK_D // BLOCK_DH
    BLOCK_C: tl.constexpr = 64  # head-dim chunk of the prefix programs' scores with SPLIT_D
    pid = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    qk_scale = scale * LOG2E
    n_p = tl.cdiv(P, BLOCK_P)
    n_pre = n_p * n_groups * D_PARTS
    if pid < n_pre:
        # ---- a prefix tile of one batch row and kv head (a part of the head dim)
        part = pid % D_PARTS
        pid_p = pid // D_PARTS
        offs_dh = part * BLOCK_DH + tl.arange(0, BLOCK_DH)
        dh_ok = offs_dh < HEAD_DIM
        ds_now = part == 0  # one part stores dS
        local = pid_p // n_p
        bk = group0 + local
        b = (bk // Hkv).to(tl.int64)
        hk = (bk % Hkv).to(tl.int64)
        offs_p = (pid_p % n_p) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_ok = offs_p < P
        pk_ptr = PK + b * spkb + hk * spkh
        pv_ptr = PV + b * spvb + hk * spvh
        if SPLIT_D:  # read by chunks in the loop
            pk = 0
            pv = 0
        else:
            pk = load_tile(pk_ptr + offs_p[:, None] * spkn + offs_d[None, :] * spkd, p_ok,
                           d_ok, True, MASK_D)
            pv = load_tile(pv_ptr + offs_p[:, None] * spvn + offs_d[None, :] * spvd, p_ok,
                           d_ok, True, MASK_D)
        # transposed; partials in DPK, DPV themselves
        mask_t = dh_ok[:, None] & p_ok[None, :]
        dpk = DPK + b * sdpkb + hk * sdpkh
        dpv = DPV + b * sdpvb + hk * sdpvh
        dkt = _start(dpk, offs_dh, offs_p, 1, HEAD_DIM, mask_t, True, ACC_IN)
        dvt = _start(dpv, offs_dh, offs_p, 1, HEAD_DIM, mask_t, True, ACC_IN)
        h0 = hk * G  # the group's first query head
        row = (b * Hq + h0) * Lq
        q_ptr = Q + b * sqb + h0 * sqh
        do_ptr = DO + b * sdob + h0 * sdoh
        ds_ptr = DS + local.to(tl.int64) * G * ds_head_stride
        n_full = (row1 - row0) // BLOCK_MP
        dkt, dvt = _prefix_tile_steps(
            pk, pv, pk_ptr, pv_ptr, spkn, spkd, spvn, spvd, dkt, dvt, offs_p, p_ok, q_ptr,
            do_ptr, LSE + row, DELTA + row, ds_ptr,
            row0, n_full, G, Lq, sqh, sqm, sqd, sdoh, sdom, sdod, ds_rows, ds_head_stride,
            offs_d, d_ok, offs_dh, dh_ok, ds_now, qk_scale, False, STORE_DS, MASK_D, SPLIT_D,
            DOT_FP32, BLOCK_MP, PREFIX_STAGES, HEAD_DIM, BLOCK_C)
        dkt, dvt = _prefix_tile_steps(
            pk, pv, pk_ptr, pv_ptr, spkn, spkd, spvn, spvd, dkt, dvt, offs_p, p_ok, q_ptr,
            do_ptr, LSE + row, DELTA + row,
            ds_ptr + n_full * BLOCK_MP * ds_rows, row0 + n_full * BLOCK_MP,
            tl.cdiv(row1 - row0, BLOCK_MP) - n_full, G, Lq, sqh, sqm, sqd, sdoh, sdom, sdod,
            ds_rows, ds_head_stride, offs_d, d_ok, offs_dh, dh_ok, ds_now, qk_scale, True,
            STORE_DS, MASK_D, SPLIT_D, DOT_FP32, BLOCK_MP, PREFIX_STAGES, HEAD_DIM, BLOCK_C)
        _finish(dpk, dpk, dkt, offs_dh, offs_p, sdpkd, sdpkn, sdpkd, sdpkn, mask_t, scale,
                ACC_OUT)
        _finish(dpv, dpv, dvt, offs_dh, offs_p, sdpvd, sdpvn, sdpvd, sdpvn, mask_t, 1.0,
                ACC_OUT)
    else:
        # ---- a sequence key tile of one batch row and kv head (a part of the head dim)
        pid_s = pid - n_pre
        part = pid_s % D_PARTS
        pid_s = pid_s // D_PARTS
        offs_dh = part * BLOCK_DH + tl.arange(0, BLOCK_DH)
        dh_ok = offs_dh < HEAD_DIM
        ds_now = part == 0  # one part stores dS
        n_n = tl.cdiv(n_keys, BLOCK_N)
        nb = pid_s % n_n
        local = pid_s // n_n
        bk = group0 + local
        b = (bk // Hkv).to(tl.int64)
        hk = (bk % Hkv).to(tl.int64)
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Lk
        k = load_tile(K + b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                      n_ok, d_ok, True, MASK_D)
        v = load_tile(V + b * svb + hk * svh + offs_n[:, None] * svn + offs_d[None, :] * svd,
                      n_ok, d_ok, True, MASK_D)
        ds_n_ok = offs_n < n_keys  # the slice's dS holds the keys its rows see
        keep_n = n_ok
        if HAS_PAD:
            keep_n = tl.load(KPM + b * smb + offs_n * smn, mask=n_ok, other=0) != 0
        diag = Lk - Lq  # query i sees key j iff j <= i + diag
        row_full = row1 // BLOCK_M * BLOCK_M
        if CAUSAL:  # first query tile that sees the key tile; first that sees all of it
            first_row = tl.maximum(nb * BLOCK_N - diag, 0)
            lo = tl.maximum(first_row // BLOCK_M * BLOCK_M, row0)
            full_lo = tl.cdiv(tl.maximum(nb * BLOCK_N + BLOCK_N - 1 - diag, 0), BLOCK_M) * BLOCK_M
        else:
            first_row = nb * 0
            lo = row0 + nb * 0
            full_lo = row0 + nb * 0
        mask = n_ok[:, None] & dh_ok[None, :]
        acc = bk.to(tl.int64) * Lk * HEAD_DIM  # (B * Hkv, Lk, HEAD_DIM) contiguous
        seen = first_row < row0  # by the row slices before this one
        dk = _start(DK_ACC + acc, offs_n, offs_dh, HEAD_DIM, 1, mask, seen, ACC_IN)
        dv = _start(DV_ACC + acc, offs_n, offs_dh, HEAD_DIM, 1, mask, seen, ACC_IN)
        mid = tl.minimum(tl.maximum(full_lo, lo), row_full)
        tail = tl.maximum(row_full, lo)
        h0 = hk * G  # the group's first query head
        row = (b * Hq + h0) * Lq
        q_ptr = Q + b * sqb + h0 * sqh
        do_ptr = DO + b * sdob + h0 * sdoh
        ds_ptr = DS + local.to(tl.int64) * G * ds_head_stride + ds_seq_col
        # on the causal band: masked; below it: no masks; the ragged last query tile
        dk, dv = _key_tile_steps(
            k, v, dk, dv, offs_n, ds_n_ok, keep_n, q_ptr, do_ptr, LSE + row, DELTA + row,
            ds_ptr + (lo - row0) * ds_rows, lo, (mid - lo) // BLOCK_M, G, Lq, diag, sqh, sqm,
            sqd, sdoh, sdom, sdod, ds_rows, ds_head_stride, offs_d, d_ok, offs_dh, dh_ok, ds_now,
            qk_scale, False, CAUSAL, HAS_PAD, STORE_DS, MASK_D, SPLIT_D, DOT_FP32, BLOCK_M)
        dk, dv = _key_tile_steps(
            k, v, dk, dv, offs_n, ds_n_ok, keep_n, q_ptr, do_ptr, LSE + row, DELTA + row,
            ds_ptr + (mid - row0) * ds_rows, mid, (row_full - mid) // BLOCK_M, G, Lq, diag,
            sqh, sqm, sqd, sdoh, sdom, sdod, ds_rows, ds_head_stride, offs_d, d_ok, offs_dh,
            dh_ok, ds_now, qk_scale, False, False, HAS_PAD, STORE_DS, MASK_D, SPLIT_D, DOT_FP32,
            BLOCK_M)
        dk, dv = _key_tile_steps(
            k, v, dk, dv, offs_n, ds_n_ok, keep_n, q_ptr, do_ptr, LSE + row, DELTA + row,
            ds_ptr + (tail - row0) * ds_rows, tail, tl.cdiv(row1 - tail, BLOCK_M), G, Lq, diag,
            sqh, sqm, sqd, sdoh, sdom, sdod, ds_rows, ds_head_stride, offs_d, d_ok, offs_dh,
            dh_ok, ds_now, qk_scale, True, CAUSAL, HAS_PAD, STORE_DS, MASK_D, SPLIT_D, DOT_FP32,
            BLOCK_M)
        _finish(DK + b * sdkb + hk * sdkh, DK_ACC + acc, dk, offs_n, offs_dh, sdkn, sdkd,
                acc_stride, 1, mask, scale, ACC_OUT)
        _finish(DV + b * sdvb + hk * sdvh, DV_ACC + acc, dv, offs_n, offs_dh, sdvn, sdvd,
                acc_stride, 1, mask, 1.0, ACC_OUT)
