"""Forward of prefix attention for decoding, Lq = 1..16, with a split-K path.

One program per (batch, kv head, row block, key split), 1-D grid. The G * Lq queries of a kv
head (every query head of its group, every query position) are packed as the rows of one tile,
so K and V are read once per kv head, not once per query head. The tile is computed transposed
(S^T = K Q^T, O^T += V^T P^T): the key tile and the head dim are the M sides of the matmuls
(>= 64, what wgmma needs) and the few query rows the N side.

Split-K: with few (batch, kv head) pairs the key range is cut into `n_splits` ranges, each
program normalises its own partial output and LSE (fp32 workspace), and a merge kernel combines
the splits by their LSEs in split order (deterministic). Split 0 also covers the prefix. With
one split the kernel writes out and LSE directly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import attention_common as common
from .attention_common import LN2, LOG2E, dot, load_tile

# Splits of the key range: None = automatic (enough programs for the GPU's SMs); tests force it.
DECODE_SPLITS: int | None = None
MIN_KEYS_PER_SPLIT = 256
MAX_SPLITS = 64
MERGE_ROWS = 16


@triton.jit
def attend_t(qt, m_i, l_i, acc_t, k_ptr, v_ptr, kpm_ptr, lo, hi, n_limit, last_key,
             skn, skd, svn, svd, smn, offs_d, d_ok, qk_scale,
             MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr,
             MASK_D: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online softmax, transposed, over key tiles [lo, hi): qt (BLOCK_D, R); m_i, l_i (R,);
    acc_t (BLOCK_D, R). Masks as in attention_forward.attend, along axis 0."""
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < n_limit
        k = load_tile(k_ptr + cols[:, None] * skn + offs_d[None, :] * skd, col_ok, d_ok,
                      MASKED, MASK_D)
        v = load_tile(v_ptr + cols[:, None] * svn + offs_d[None, :] * svd, col_ok, d_ok,
                      MASKED, MASK_D)
        s = dot(k, qt, DOT_FP32)  # (N, R)
        if MASKED or HAS_PAD:
            keep = col_ok
            if HAS_PAD:
                keep = keep & (tl.load(kpm_ptr + cols * smn, mask=col_ok, other=0) != 0)
            keep2 = keep[:, None]
            if CAUSAL:
                keep2 = keep2 & (cols[:, None] <= last_key[None, :])
            s = tl.where(keep2, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0) * qk_scale)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s * qk_scale - m_use[None, :])
        l_i = l_i * alpha + tl.sum(p, 0)
        acc_t = acc_t * alpha[None, :] + dot(tl.trans(v), p.to(v.dtype), DOT_FP32)
        m_i = m_new
    return m_i, l_i, acc_t


@common.autotune("decode", key=["LK_KEY", "P_KEY", "ROWS_KEY", "BLOCK_D", "CAUSAL", "HAS_PAD",
                                "SPLIT"])
@triton.jit
def _decode_kernel(
    Q, K, V, PK, PV, KPM, O, LSE, O_PART, LSE_PART,
    Hkv, G, Lq, Lk, P, scale, n_row_blocks, n_splits, split_len,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    spkb, spkh, spkn, spkd, spvb, spvh, spvn, spvd, smb, smn,
    sob, soh, som, sod,
    LK_KEY, P_KEY, ROWS_KEY,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, SPLIT: tl.constexpr, DOT_FP32: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    MASK_D: tl.constexpr = BLOCK_D != HEAD_DIM
    pid = tl.program_id(0)
    split = pid % n_splits
    rest = pid // n_splits
    rb = rest % n_row_blocks
    bk = rest // n_row_blocks
    b = (bk // Hkv).to(tl.int64)
    hk = (bk % Hkv).to(tl.int64)
    R = G * Lq
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)  # row r = query head hk * G + r // Lq, query r % Lq
    r_ok = rows < R
    i = rows % Lq
    h = hk * G + rows // Lq
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    qt = load_tile(Q + b * sqb + offs_d[:, None] * sqd + (h * sqh + i * sqm)[None, :],
                   d_ok, r_ok, MASK_D, True)  # (BLOCK_D, BLOCK_R)
    qk_scale = scale * LOG2E
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc_t = tl.zeros([BLOCK_D, BLOCK_R], tl.float32)
    diag = Lk - Lq
    last_key = i + diag

    # the prefix (split 0 only)
    p_hi = tl.where(split == 0, P, 0)
    p_full = p_hi // BLOCK_P * BLOCK_P
    pk_ptr = PK + b * spkb + hk * spkh
    pv_ptr = PV + b * spvb + hk * spvh
    m_i, l_i, acc_t = attend_t(qt, m_i, l_i, acc_t, pk_ptr, pv_ptr, KPM, 0, p_full, P,
                               last_key, spkn, spkd, spvn, spvd, 0, offs_d, d_ok, qk_scale,
                               False, False, False, MASK_D, DOT_FP32, BLOCK_P)
    m_i, l_i, acc_t = attend_t(qt, m_i, l_i, acc_t, pk_ptr, pv_ptr, KPM, p_full, p_hi, P,
                               last_key, spkn, spkd, spvn, spvd, 0, offs_d, d_ok, qk_scale,
                               True, False, False, MASK_D, DOT_FP32, BLOCK_P)
    # this split's sequence keys: tiles every row sees without masks, then the rest masked
    lo = split * split_len
    hi = tl.minimum(lo + split_len, Lk)
    if CAUSAL:
        full = tl.minimum(diag + 1, Lk) // BLOCK_N * BLOCK_N
    else:
        full = Lk // BLOCK_N * BLOCK_N
    mid = tl.maximum(lo, tl.minimum(hi, full))
    k_ptr = K + b * skb + hk * skh
    v_ptr = V + b * svb + hk * svh
    kpm_ptr = KPM + b * smb
    m_i, l_i, acc_t = attend_t(qt, m_i, l_i, acc_t, k_ptr, v_ptr, kpm_ptr, lo, mid, Lk,
                               last_key, skn, skd, svn, svd, smn, offs_d, d_ok, qk_scale,
                               False, False, HAS_PAD, MASK_D, DOT_FP32, BLOCK_N)
    m_i, l_i, acc_t = attend_t(qt, m_i, l_i, acc_t, k_ptr, v_ptr, kpm_ptr, mid, hi, Lk,
                               last_key, skn, skd, svn, svd, smn, offs_d, d_ok, qk_scale,
                               True, CAUSAL, HAS_PAD, MASK_D, DOT_FP32, BLOCK_N)

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out_t = acc_t / l_safe[None, :]
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) * LN2, float("-inf"))
    mask = d_ok[:, None] & r_ok[None, :]
    if SPLIT:
        row = (bk.to(tl.int64) * n_splits + split) * R + rows
        tl.store(O_PART + row[None, :] * HEAD_DIM + offs_d[:, None], out_t, mask=mask)
        tl.store(LSE_PART + row, lse, mask=r_ok)
    else:
        tl.store(O + b * sob + offs_d[:, None] * sod + (h * soh + i * som)[None, :],
                 out_t.to(O.dtype.element_ty), mask=mask)
        tl.store(LSE + bk.to(tl.int64) * R + rows, lse, mask=r_ok)


@triton.jit
def _merge_kernel(
    O_PART, LSE_PART, O, LSE, Hkv, G, Lq, n_splits, n_row_blocks, sob, soh, som, sod,
    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out, LSE of BLOCK_R packed rows from the splits' partials, merged in split order."""
    pid = tl.program_id(0)
    rb = pid % n_row_blocks
    bk = (pid // n_row_blocks).to(tl.int64)
    b = bk // Hkv
    hk = bk % Hkv
    R = G * Lq
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < R
    offs_d = tl.arange(0, BLOCK_D)
    mask = r_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for s in range(0, n_splits):
        row = (bk * n_splits + s) * R + rows
        lse_s = tl.load(LSE_PART + row, mask=r_ok, other=float("-inf")) * LOG2E
        o_s = tl.load(O_PART + row[:, None] * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0)
        m_new = tl.maximum(m, lse_s)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_use)
        w = tl.exp2(lse_s - m_use)
        acc = acc * alpha[:, None] + w[:, None] * o_s
        l = l * alpha + w
        m = m_new
    seen = l > 0.0
    l_safe = tl.where(seen, l, 1.0)
    i = rows % Lq
    h = hk * G + rows // Lq
    tl.store(O + b * sob + (h * soh + i * som)[:, None] + offs_d[None, :] * sod,
             (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=mask)
    tl.store(LSE + bk * R + rows, tl.where(seen, (m + tl.log2(l_safe)) * LN2, float("-inf")),
             mask=r_ok)


def plan_splits(B: int, Hkv: int, row_blocks: int, Lk: int, device: torch.device
                ) -> tuple[int, int]:
    """(n_splits, split_len): split the keys only when B * Hkv * row_blocks programs leave
    SMs idle, each split at least MIN_KEYS_PER_SPLIT keys, split_len a multiple of every key
    tile."""
    gran = common.max_tile("decode", "BLOCK_N")
    if DECODE_SPLITS is not None:
        want = max(1, DECODE_SPLITS)
    else:
        base = B * Hkv * row_blocks
        sms = common.sm_count(device)
        want = 1 if base >= sms else min(triton.cdiv(2 * sms, base), MAX_SPLITS,
                                         max(1, Lk // MIN_KEYS_PER_SPLIT))
    split_len = max(gran, triton.cdiv(triton.cdiv(max(Lk, 1), want), gran) * gran)
    return triton.cdiv(max(Lk, 1), split_len), split_len


def decode_rows(G: int, Lq: int) -> int:
    """Packed rows per tile: the G * Lq queries of a kv head, 16..64."""
    return min(64, max(16, triton.next_power_of_2(G * Lq)))


def forward_decode(q, k, v, prefix: common.Prefix, padding: common.Padding, causal: bool,
                   scale: float, out, lse) -> None:
    """Fill out (B, Hq, Lq, D) and lse (B, Hq, Lq) contiguous fp32 for 1 <= Lq <= 16."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    block_r = decode_rows(G, Lq)
    row_blocks = triton.cdiv(G * Lq, block_r)
    n_splits, split_len = plan_splits(B, Hkv, row_blocks, Lk, q.device)
    split = n_splits > 1
    if split:
        o_part = torch.empty((B * Hkv * n_splits * G * Lq, D), dtype=torch.float32,
                             device=q.device)
        lse_part = torch.empty((B * Hkv * n_splits * G * Lq,), dtype=torch.float32,
                               device=q.device)
    else:
        o_part, lse_part = out, lse  # not read
    # the key tile is the M side of S^T = K Q^T: at least as wide as the smallest key tile
    block_p = max(prefix.block, min(c.kwargs["BLOCK_N"] for c in common.configs_for("decode")))
    common.launch(
        _decode_kernel, (B * Hkv * row_blocks * n_splits,),
        q, k, v, prefix.k, prefix.v, padding.mask, out, lse, o_part, lse_part,
        Hkv, G, Lq, Lk, prefix.P, float(scale), row_blocks, n_splits, split_len,
        *q.stride(), *k.stride(), *v.stride(), *prefix.k_strides, *prefix.v_strides,
        *padding.strides, *out.stride(),
        common.bucket(Lk), common.bucket(prefix.P), common.bucket(G * Lq),
        CAUSAL=bool(causal), HAS_PAD=padding.present, SPLIT=split,
        DOT_FP32=common.dot_fp32(q.dtype), HEAD_DIM=D, BLOCK_R=block_r, BLOCK_P=block_p,
        BLOCK_D=common.block_d(D),
    )
    if split:
        merge_blocks = triton.cdiv(G * Lq, MERGE_ROWS)
        common.launch(
            _merge_kernel, (B * Hkv * merge_blocks,),
            o_part, lse_part, out, lse, Hkv, G, Lq, n_splits, merge_blocks, *out.stride(),
            HEAD_DIM=D, BLOCK_R=MERGE_ROWS, BLOCK_D=common.block_d(D), num_warps=4,
        )
