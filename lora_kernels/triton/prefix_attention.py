"""Triton kernels for prefix_attention, after FlashAttention-2 and Triton's fused-attention
tutorial (own code), with their launchers (the backend contract of the package).

Layout: q (B, Hq, Lq, D); k, v (B, Hkv, Lk, D); prefix_k/v (Bp, Hkv, P, D) with Bp in {1, B}
(a stride-0 batch needs no copy); key_padding_mask (B, Lk) bool. Query head h reads kv head
h // (Hq // Hkv): grouped-query attention without copies. Any strides.

- forward: one program per (query block, batch*head): online softmax (base 2) over the prefix
  blocks, then over the sequence blocks up to the causal limit (bottom-right: query i sees key
  j iff j <= i + Lk - Lq; padding hides keys); stores out and the natural-log LSE. A row that
  sees no key gets 0 and LSE = -inf.
- backward: a pre-pass delta = rowsum(dO * O); dK/dV per (sequence block, batch*kv head),
  looping over the query heads of its group and the query blocks that can see it; the prefix
  gradient by one program per (prefix block, kv head [, batch row]) looping over the batch,
  the group's query heads and every query block, so the reduction over the batch is done in
  registers: deterministic, no atomics; dQ per (query block, batch*head) over prefix then
  sequence blocks.
Every load is masked (head dims that are not powers of two, ragged Lq, Lk, P). Dots accumulate
in fp32; fp32 inputs use IEEE fp32 dots; bf16 tiles are cast to fp32 before dots only in
Triton's interpreter (INTERPRETER, see _common.py).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ..backends import Capabilities
from ._common import INTERPRETER

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def _configs() -> list[triton.Config]:
    """Autotune candidates for every kernel of this file (keyed on the shapes). One small
    config in the interpreter, where every program is a Python loop iteration."""
    if INTERPRETER:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3), (32, 32, 4, 2)]
    ]


def _prune_configs(configs, named_args, **kwargs):
    """Drop the large tiles for head dims over 128 (registers), and keep only the first
    config when LORA_KERNELS_AUTOTUNE=0 (quick GPU tests: one compile per specialisation)."""
    keep = [c for c in configs
            if kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 0)) <= 128
            or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64] or configs[:1]
    if os.environ.get("LORA_KERNELS_AUTOTUNE", "1").strip() == "0":
        keep = keep[:1]
    return keep


_PRUNE = {"early_config_prune": _prune_configs}
_KEY = ["Lq", "Lk", "P", "BLOCK_D", "G"]


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr):
    """a @ b with an fp32 accumulator; IEEE fp32 when DOT_FP32 (fp32 inputs, or bf16 tiles in
    the interpreter), else the tensor cores in the operands' dtype."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _online_block(q, kt, v, m_i, l_i, acc, valid, qk_scale, DOT_FP32: tl.constexpr):
    """One key block of the online softmax (base 2). kt (D, N), v (N, D), valid (M, N)."""
    s = _dot(q, kt, DOT_FP32) * qk_scale
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing seen yet
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_FP32)
    return m_new, l_i, acc


@triton.autotune(configs=_configs(), key=_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _fwd_kernel(
    Q, K, V, PK, PV, KPM, O, LSE,
    Hq, G, Lq, Lk, P, D, scale,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    spkb, spkh, spkn, spkd, spvb, spvh, spvn, spvd, smb, smn,
    sob, soh, som, sod, slb, slh,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    hk = h // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Lq
    d_ok = offs_d < D
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    qk_scale = scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # prefix keys: every query sees all of them (PK/PV batch stride is 0 when shared)
    pk_base = PK + b * spkb + hk * spkh
    pv_base = PV + b * spvb + hk * spvh
    for start in range(0, P, BLOCK_N):
        cols = start + offs_n
        c_ok = cols < P
        kt = tl.load(pk_base + cols[None, :] * spkn + offs_d[:, None] * spkd,
                     mask=c_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(pv_base + cols[:, None] * spvn + offs_d[None, :] * spvd,
                    mask=c_ok[:, None] & d_ok[None, :], other=0.0)
        valid = m_ok[:, None] & c_ok[None, :]
        m_i, l_i, acc = _online_block(q, kt, v, m_i, l_i, acc, valid, qk_scale, DOT_FP32)
    # sequence keys up to the causal limit of the block's last query
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    hi = Lk
    if CAUSAL:
        hi = tl.minimum(Lk, (pid_m + 1) * BLOCK_M + Lk - Lq)
    for start in range(0, hi, BLOCK_N):
        cols = start + offs_n
        c_ok = cols < Lk
        if HAS_PAD:
            keep = tl.load(KPM + b * smb + cols * smn, mask=c_ok, other=0)
            c_ok = c_ok & (keep != 0)
        kt = tl.load(k_base + cols[None, :] * skn + offs_d[:, None] * skd,
                     mask=c_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :] * svd,
                    mask=c_ok[:, None] & d_ok[None, :], other=0.0)
        valid = m_ok[:, None] & c_ok[None, :]
        if CAUSAL:
            valid = valid & (cols[None, :] <= offs_m[:, None] + (Lk - Lq))
        m_i, l_i, acc = _online_block(q, kt, v, m_i, l_i, acc, valid, qk_scale, DOT_FP32)
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    tl.store(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + b * slb + h * slh + offs_m, lse, mask=m_ok)


@triton.jit
def _delta_kernel(
    O, DO, DELTA, Hq, Lq, D,
    sob, soh, som, sod, sdb, sdh, sdm, sdd,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta[b, h, i] = sum_d dO * O (fp32), contiguous (B, Hq, Lq)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < Lq)[:, None] & (offs_d < D)[None, :]
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :] * sdd,
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * Lq + offs_m, tl.sum(o * do, 1), mask=offs_m < Lq)


@triton.autotune(configs=_configs(), key=["Lq", "Lk", "N", "BLOCK_D", "G", "IS_PREFIX"],
                  prune_configs_by=_PRUNE)
@triton.jit
def _bwd_kv_kernel(
    Q, KX, VX, DO, LSE, DELTA, KPM, DKX, DVX,
    B, Hq, Hkv, G, Lq, Lk, N, D, scale, b_per_prog,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sdob, sdoh, sdom, sdod, smb, smn,
    sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
    IS_PREFIX: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dK, dV of one block of N keys of one kv head, summed over the batch rows
    [bx * b_per_prog, (bx + 1) * b_per_prog), the group's query heads and the query blocks
    that see the block. Sequence keys: b_per_prog = 1, bx = the batch row. Prefix keys: bx is
    the row (per-row prefix) or the split of the batch (shared prefix, key batch stride 0),
    and DKX/DVX (n_splits, Hkv, P, D) receive one partial sum per split."""
    pid_n = tl.program_id(0)
    pid_bk = tl.program_id(1)
    bx = (pid_bk // Hkv).to(tl.int64)
    hk = (pid_bk % Hkv).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < N
    d_ok = offs_d < D
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(KX + bx * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                mask=kv_mask, other=0.0)
    v = tl.load(VX + bx * svb + hk * svh + offs_n[:, None] * svn + offs_d[None, :] * svd,
                mask=kv_mask, other=0.0)
    if HAS_PAD:
        keep = tl.load(KPM + bx * smb + offs_n * smn, mask=n_ok, other=0)
        n_ok = n_ok & (keep != 0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    qk_scale = scale * 1.4426950408889634
    lo = 0
    if CAUSAL:
        lo = tl.maximum(0, pid_n * BLOCK_N - (Lk - Lq)) // BLOCK_M * BLOCK_M
    offs_mb = tl.arange(0, BLOCK_M)
    b_lo = bx * b_per_prog
    b_hi = tl.minimum(b_lo + b_per_prog, B)
    for b in range(b_lo, b_hi):
        for g in range(0, G):
            h = hk * G + g
            q_base = Q + b * sqb + h * sqh
            do_base = DO + b * sdob + h * sdoh
            row_base = (b * Hq + h) * Lq
            for start_m in range(lo, Lq, BLOCK_M):
                offs_m = start_m + offs_mb
                m_ok = offs_m < Lq
                md = m_ok[:, None] & d_ok[None, :]
                q = tl.load(q_base + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                            mask=md, other=0.0)
                do = tl.load(do_base + offs_m[:, None] * sdom + offs_d[None, :] * sdod,
                             mask=md, other=0.0)
                lse = tl.load(LSE + row_base + offs_m, mask=m_ok, other=float("inf"))
                lse = tl.where(lse == float("-inf"), float("inf"), lse)  # a row saw no key
                delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
                s = _dot(q, tl.trans(k), DOT_FP32) * qk_scale
                p = tl.exp2(s - (lse * 1.4426950408889634)[:, None])
                valid = m_ok[:, None] & n_ok[None, :]
                if CAUSAL:
                    valid = valid & (offs_n[None, :] <= offs_m[:, None] + (Lk - Lq))
                p = tl.where(valid, p, 0.0)
                dv += _dot(tl.trans(p.to(do.dtype)), do, DOT_FP32)
                dp = _dot(do, tl.trans(v), DOT_FP32)
                ds = p * (dp - delta[:, None])
                dk += _dot(tl.trans(ds.to(q.dtype)), q, DOT_FP32)
    dk = dk * scale
    tl.store(DKX + bx * sdkb + hk * sdkh + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd,
             dk.to(DKX.dtype.element_ty), mask=kv_mask)
    tl.store(DVX + bx * sdvb + hk * sdvh + offs_n[:, None] * sdvn + offs_d[None, :] * sdvd,
             dv.to(DVX.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_block(q, do, lse2, delta, kt, v, valid, qk_scale, DOT_FP32: tl.constexpr):
    """dS @ K (unscaled) of one key block for a block of queries; kt (D, N), v (N, D)."""
    s = _dot(q, kt, DOT_FP32) * qk_scale
    p = tl.where(valid, tl.exp2(s - lse2[:, None]), 0.0)
    dp = _dot(do, tl.trans(v), DOT_FP32)
    ds = p * (dp - delta[:, None])
    return _dot(ds.to(kt.dtype), tl.trans(kt), DOT_FP32)


@triton.autotune(configs=_configs(), key=_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _bwd_dq_kernel(
    Q, K, V, PK, PV, KPM, DO, LSE, DELTA, DQ,
    Hq, G, Lq, Lk, P, D, scale,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    spkb, spkh, spkn, spkd, spvb, spvh, spvn, spvd, smb, smn,
    sdob, sdoh, sdom, sdod, sdqb, sdqh, sdqm, sdqd,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    hk = h // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Lq
    d_ok = offs_d < D
    md = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=md, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_d[None, :] * sdod,
                 mask=md, other=0.0)
    row = pid_bh.to(tl.int64) * Lq + offs_m
    lse = tl.load(LSE + row, mask=m_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(DELTA + row, mask=m_ok, other=0.0)
    qk_scale = scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    pk_base = PK + b * spkb + hk * spkh
    pv_base = PV + b * spvb + hk * spvh
    for start in range(0, P, BLOCK_N):
        cols = start + offs_n
        c_ok = cols < P
        kt = tl.load(pk_base + cols[None, :] * spkn + offs_d[:, None] * spkd,
                     mask=c_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(pv_base + cols[:, None] * spvn + offs_d[None, :] * spvd,
                    mask=c_ok[:, None] & d_ok[None, :], other=0.0)
        valid = m_ok[:, None] & c_ok[None, :]
        dq += _dq_block(q, do, lse2, delta, kt, v, valid, qk_scale, DOT_FP32)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    hi = Lk
    if CAUSAL:
        hi = tl.minimum(Lk, (pid_m + 1) * BLOCK_M + Lk - Lq)
    for start in range(0, hi, BLOCK_N):
        cols = start + offs_n
        c_ok = cols < Lk
        if HAS_PAD:
            keep = tl.load(KPM + b * smb + cols * smn, mask=c_ok, other=0)
            c_ok = c_ok & (keep != 0)
        kt = tl.load(k_base + cols[None, :] * skn + offs_d[:, None] * skd,
                     mask=c_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :] * svd,
                    mask=c_ok[:, None] & d_ok[None, :], other=0.0)
        valid = m_ok[:, None] & c_ok[None, :]
        if CAUSAL:
            valid = valid & (cols[None, :] <= offs_m[:, None] + (Lk - Lq))
        dq += _dq_block(q, do, lse2, delta, kt, v, valid, qk_scale, DOT_FP32)
    dq = dq * scale
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :] * sdqd,
             dq.to(DQ.dtype.element_ty), mask=md)


# ----------------------------------------------------------------------------------------------
# launchers


CAPABILITIES = Capabilities(devices=("cuda", "cpu"),
                            dtypes=(torch.float32, torch.float16, torch.bfloat16),
                            max_head_dim=256, dropout=False)


def not_supported_reasons(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, dropout_p,
                          training) -> list[str]:
    """Why these kernels cannot serve the inputs (empty: they can)."""
    return CAPABILITIES.reasons({"q": q}, head_dim=q.shape[-1], dropout=dropout_p > 0 and training)


# Splits of the batch for the gradient of a shared prefix: None = automatic (one program per
# (prefix block, kv head) in the interpreter, as FlashAttention's design; on a GPU enough
# splits to fill the SMs). Tests force a value to check both paths.
PREFIX_BATCH_SPLITS: int | None = None


def _prefix_batch_splits(B: int, Hkv: int, P: int, device: torch.device) -> int:
    if PREFIX_BATCH_SPLITS is not None:
        return max(1, min(B, PREFIX_BATCH_SPLITS))
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(B, sms // max(1, Hkv * triton.cdiv(P, 64))))


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _dot_fp32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or (INTERPRETER and dtype == torch.bfloat16)


def _prefix_args(prefix_k, prefix_v, q):
    """Pointers, P, and strides (batch stride 0 when shared) of the prefix."""
    if prefix_k is None or prefix_k.shape[2] == 0:
        return q, q, 0, (0, 0, 0, 0), (0, 0, 0, 0)
    sk, sv = list(prefix_k.stride()), list(prefix_v.stride())
    if prefix_k.shape[0] == 1:
        sk[0] = sv[0] = 0
    return prefix_k, prefix_v, prefix_k.shape[2], tuple(sk), tuple(sv)


def _mask_args(key_padding_mask, q):
    if key_padding_mask is None:
        return q, 0, 0, False
    m = key_padding_mask.view(torch.uint8)
    return m, m.stride(0), m.stride(1), True


def forward(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale):
    """q (B, Hq, Lq, D); k, v (B, Hkv, Lk, D); prefix_k/v (Bp, Hkv, P, D) or None;
    key_padding_mask (B, Lk) bool or None -> (out (B, Hq, Lq, D) q.dtype, lse (B, Hq, Lq) fp32)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(-math.inf)
    pk, pv, P, spk, spv = _prefix_args(prefix_k, prefix_v, q)
    kpm, smb, smn, has_pad = _mask_args(key_padding_mask, q)
    grid = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * Hq)
    _fwd_kernel[grid](
        q, k, v, pk, pv, kpm, out, lse,
        Hq, Hq // Hkv, Lq, Lk, P, D, float(scale),
        *q.stride(), *k.stride(), *v.stride(), *spk, *spv, smb, smn,
        *out.stride(), lse.stride(0), lse.stride(1),
        CAUSAL=bool(causal), HAS_PAD=has_pad, DOT_FP32=_dot_fp32(q.dtype),
        BLOCK_D=_block_d(D),
    )
    return out, lse


def backward(dout, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, causal, scale):
    """Gradients (dq, dk, dv, dprefix_k, dprefix_v) in the inputs' shapes and dtypes
    (dprefix (Bp, Hkv, P, D), None when there is no prefix)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    BLOCK_D = _block_d(D)
    dot_fp32 = _dot_fp32(q.dtype)
    dq = torch.zeros_like(q, memory_format=torch.contiguous_format)
    dk = torch.zeros_like(k, memory_format=torch.contiguous_format)
    dv = torch.zeros_like(v, memory_format=torch.contiguous_format)
    has_prefix = prefix_k is not None
    dpk = None if not has_prefix else torch.zeros(prefix_k.shape, dtype=prefix_k.dtype,
                                                  device=q.device)
    dpv = None if not has_prefix else torch.zeros(prefix_v.shape, dtype=prefix_v.dtype,
                                                  device=q.device)
    if q.numel() == 0:
        return dq, dk, dv, dpk, dpv
    lse = lse.contiguous()
    delta = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
    _delta_kernel[(triton.cdiv(Lq, 16), B * Hq)](
        out, dout, delta, Hq, Lq, D, *out.stride(), *dout.stride(),
        BLOCK_M=16, BLOCK_D=BLOCK_D,
    )
    pk, pv, P, spk, spv = _prefix_args(prefix_k, prefix_v, q)
    kpm, smb, smn, has_pad = _mask_args(key_padding_mask, q)
    common = dict(DOT_FP32=dot_fp32, BLOCK_D=BLOCK_D)
    if Lk > 0:
        grid = lambda meta: (triton.cdiv(Lk, meta["BLOCK_N"]), B * Hkv)
        _bwd_kv_kernel[grid](
            q, k, v, dout, lse, delta, kpm, dk, dv,
            B, Hq, Hkv, G, Lq, Lk, Lk, D, float(scale), 1,
            *q.stride(), *k.stride(), *v.stride(), *dout.stride(), smb, smn,
            *dk.stride(), *dv.stride(),
            IS_PREFIX=False, CAUSAL=bool(causal), HAS_PAD=has_pad, **common,
        )
    if P > 0:
        Bp = prefix_k.shape[0]
        splits = Bp if Bp > 1 else _prefix_batch_splits(B, Hkv, P, q.device)
        per_prog = triton.cdiv(B, splits)
        splits = triton.cdiv(B, per_prog)
        # a shared prefix summed over several splits of the batch: one fp32 partial per split,
        # added up in a fixed order below (deterministic, no atomics)
        partial = Bp == 1 and splits > 1
        dpk_x = dpk if not partial else torch.empty((splits, Hkv, P, D), dtype=torch.float32,
                                                     device=q.device)
        dpv_x = dpv if not partial else torch.empty_like(dpk_x)
        grid = lambda meta: (triton.cdiv(P, meta["BLOCK_N"]), splits * Hkv)
        _bwd_kv_kernel[grid](
            q, pk, pv, dout, lse, delta, kpm, dpk_x, dpv_x,
            B, Hq, Hkv, G, Lq, Lk, P, D, float(scale), per_prog,
            *q.stride(), *spk, *spv, *dout.stride(), 0, 0,
            *dpk_x.stride(), *dpv_x.stride(),
            IS_PREFIX=True, CAUSAL=False, HAS_PAD=False, **common,
        )
        if partial:
            dpk.copy_(dpk_x.sum(0, keepdim=True))
            dpv.copy_(dpv_x.sum(0, keepdim=True))
    grid = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * Hq)
    _bwd_dq_kernel[grid](
        q, k, v, pk, pv, kpm, dout, lse, delta, dq,
        Hq, G, Lq, Lk, P, D, float(scale),
        *q.stride(), *k.stride(), *v.stride(), *spk, *spv, smb, smn,
        *dout.stride(), *dq.stride(),
        CAUSAL=bool(causal), HAS_PAD=has_pad, **common,
    )
    return dq, dk, dv, dpk, dpv
