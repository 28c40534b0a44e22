"""Forward of prefix attention for Lq > 16 (FlashAttention-2 style; decoding is in
attention_decode.py).

One program per (batch, query head, query block), 1-D grid, query blocks of a head in
descending order (the longest causal blocks start first). Online softmax in base 2 over:
  1. the prefix, in tiles of its own width BLOCK_P (P = 32 fills a 32-wide tile): full tiles
     unmasked, the ragged tail masked;
  2. the sequence keys every row of the block sees (off the causal band, inside Lk): no masks;
  3. the on-band tiles up to the causal limit of the block's last query: causal + bounds masks.
Padding masks keys in 2 and 3. Stores out (B, Hq, Lq, D) and the natural-log LSE (B, Hq, Lq),
fp32; a row that sees no key gets 0 and LSE = -inf.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import attention_common as common
from .attention_common import LN2, LOG2E, dot, load_tile, store_tile


@triton.jit
def attend(q, m_i, l_i, acc, k_ptr, v_ptr, kpm_ptr, lo, hi, n_limit, last_key,
           skn, skd, svn, svd, smn, offs_d, d_ok, qk_scale,
           MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr,
           MASK_D: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online-softmax steps over the key tiles [lo, hi) (step BLOCK_N) of one head.

    q (M, BLOCK_D); m_i, l_i (M,) running max (base 2, scaled) and sum; acc (M, BLOCK_D).
    MASKED: keys >= n_limit are hidden and, with CAUSAL, keys j > last_key[i]; HAS_PAD: keys
    whose kpm byte is 0 are hidden. Returns (m_i, l_i, acc)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < n_limit
        k = load_tile(k_ptr + cols[:, None] * skn + offs_d[None, :] * skd, col_ok, d_ok,
                      MASKED, MASK_D)
        v = load_tile(v_ptr + cols[:, None] * svn + offs_d[None, :] * svd, col_ok, d_ok,
                      MASKED, MASK_D)
        s = dot(q, tl.trans(k), DOT_FP32)
        if MASKED or HAS_PAD:
            keep = col_ok
            if HAS_PAD:
                keep = keep & (tl.load(kpm_ptr + cols * smn, mask=col_ok, other=0) != 0)
            keep2 = keep[None, :]
            if CAUSAL:
                keep2 = keep2 & (cols[None, :] <= last_key[:, None])
            s = tl.where(keep2, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing seen yet
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s * qk_scale - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, DOT_FP32)
        m_i = m_new
    return m_i, l_i, acc


@common.autotune("fwd", key=["LQ_KEY", "LK_KEY", "P_KEY", "G", "BLOCK_D", "CAUSAL", "HAS_PAD"])
@triton.jit
def _fwd_kernel(
    Q, K, V, PK, PV, KPM, O, LSE,
    Hq, G, Lq, Lk, P, scale,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    spkb, spkh, spkn, spkd, spvb, spvh, spvn, spvd, smb, smn,
    sob, soh, som, sod,
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
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Lq
    d_ok = offs_d < HEAD_DIM
    q = load_tile(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                  m_ok, d_ok, True, MASK_D)
    qk_scale = scale * LOG2E
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    diag = Lk - Lq  # query i sees sequence key j iff j <= i + diag (causal)
    last_key = offs_m + diag

    # 1. the prefix: full tiles without masks, then the ragged tail (every query sees it)
    pk_ptr = PK + b * spkb + hk * spkh
    pv_ptr = PV + b * spvb + hk * spvh
    p_full = P // BLOCK_P * BLOCK_P
    m_i, l_i, acc = attend(q, m_i, l_i, acc, pk_ptr, pv_ptr, KPM, 0, p_full, P, last_key,
                           spkn, spkd, spvn, spvd, 0, offs_d, d_ok, qk_scale,
                           False, False, False, MASK_D, DOT_FP32, BLOCK_P)
    m_i, l_i, acc = attend(q, m_i, l_i, acc, pk_ptr, pv_ptr, KPM, p_full, P, P, last_key,
                           spkn, spkd, spvn, spvd, 0, offs_d, d_ok, qk_scale,
                           True, False, False, MASK_D, DOT_FP32, BLOCK_P)

    # 2./3. sequence keys: the tiles every row sees (no masks), then the band up to `hi`
    if CAUSAL:
        hi = tl.minimum(Lk, tl.minimum(mb * BLOCK_M + BLOCK_M, Lq) + diag)
        full = tl.minimum(mb * BLOCK_M + diag + 1, Lk) // BLOCK_N * BLOCK_N
    else:
        hi = Lk
        full = Lk // BLOCK_N * BLOCK_N
    k_ptr = K + b * skb + hk * skh
    v_ptr = V + b * svb + hk * svh
    kpm_ptr = KPM + b * smb
    m_i, l_i, acc = attend(q, m_i, l_i, acc, k_ptr, v_ptr, kpm_ptr, 0, full, Lk, last_key,
                           skn, skd, svn, svd, smn, offs_d, d_ok, qk_scale,
                           False, False, HAS_PAD, MASK_D, DOT_FP32, BLOCK_N)
    m_i, l_i, acc = attend(q, m_i, l_i, acc, k_ptr, v_ptr, kpm_ptr, full, hi, Lk, last_key,
                           skn, skd, svn, svd, smn, offs_d, d_ok, qk_scale,
                           True, CAUSAL, HAS_PAD, MASK_D, DOT_FP32, BLOCK_N)

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) * LN2, float("-inf"))
    store_tile(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
               out.to(O.dtype.element_ty), m_ok, d_ok, True, MASK_D)
    tl.store(LSE + bh.to(tl.int64) * Lq + offs_m, lse, mask=m_ok)


def forward_prefill(q, k, v, prefix: common.Prefix, padding: common.Padding, causal: bool,
                    scale: float, out, lse) -> None:
    """Fill out (B, Hq, Lq, D) and lse (B, Hq, Lq) contiguous fp32 for Lq >= 1."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    grid = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]) * B * Hq,)
    common.launch(
        _fwd_kernel, grid,
        q, k, v, prefix.k, prefix.v, padding.mask, out, lse,
        Hq, Hq // Hkv, Lq, Lk, prefix.P, float(scale),
        *q.stride(), *k.stride(), *v.stride(), *prefix.k_strides, *prefix.v_strides,
        *padding.strides, *out.stride(),
        common.bucket(Lq), common.bucket(Lk), common.bucket(prefix.P),
        CAUSAL=bool(causal), HAS_PAD=padding.present, DOT_FP32=common.dot_fp32(q.dtype),
        HEAD_DIM=D, BLOCK_P=prefix.block, BLOCK_D=common.block_d(D),
    )
