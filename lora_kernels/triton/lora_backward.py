"""Backward kernels of lora_linear (launched by :mod:`.lora_linear`). No atomics: every
reduction that spans programs writes fp32 partials that the launcher sums in a fixed order.

``_ds_db``  one pass over dY for both dS = scaling dY B (T, r) and dB = scaling dY^T S (out, r).
            Program (row block i, column group j) reads dY[i, j]: its dS partial (over j's
            columns) goes to ``ds_part[j]``, its dB rows (over i's rows) to ``db_part[i]``.
            Block rows and column groups are the launcher's (not autotuned), so the partial
            buffers and the summation order depend on the shape only.
``_da``     dA = dS^T dropout(x) / (1 - p): one pass over x, rows split into ``n_split``
            chunks whose (r, in) partials the launcher sums.
dX = dY W + keep * (dS A) / (1 - p) is :mod:`.lora_gemm`. It and dA read the keep bits the
forward stored; neither runs Philox.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import INTERPRETER
from .lora_dots import split_dot
from .lora_dropout import load_keep

# Rows per dS/dB program and per dA row chunk are multiples of this (the largest BLOCK_M).
ROW_QUANTUM = 256


def configs(kernel: str) -> list[triton.Config]:
    """Autotune configurations of ``_ds_db`` / ``_da`` (one small one in the
    interpreter). Every one compiles for sm_90 without spills, with wgmma in every dot."""
    if INTERPRETER:
        one = {"ds_db": {"BLOCK_N": 32}, "da": {"BLOCK_M": 32, "BLOCK_N": 32}}[kernel]
        return [triton.Config(one, num_warps=4, num_stages=1)]
    if kernel == "ds_db":
        return [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=st)
                for bn, w, st in [(64, 8, 3), (128, 8, 3), (64, 4, 4)]]
    if kernel == "da":
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
                for bm, bn, w, st in [(64, 128, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4)]]
    raise KeyError(kernel)


@triton.autotune(configs=configs("ds_db"), key=["T_KEY", "OUT", "R", "NEED_DS", "NEED_DB"])
@triton.jit
def _ds_db(
    dy_ptr, b_ptr, s_ptr, ds_ptr, db_ptr,
    scaling,
    T, OUT, R, T_KEY, GROUP_COLS, N_GROUPS,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_sm,
    NEED_DS: tl.constexpr, NEED_DB: tl.constexpr,
    NY: tl.constexpr, NB: tl.constexpr, NS: tl.constexpr, ORDER: tl.constexpr,
    LT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (row block, column group, rank chunk): ds_part[group, rows, chunk] and
    db_part[row block, group's columns, chunk]; partials (G, T, R) and (T / BLOCK_M, OUT, R)."""
    pid = tl.program_id(0)
    n_chunks = tl.cdiv(R, BLOCK_R)
    chunk = pid % n_chunks
    group = (pid // n_chunks) % N_GROUPS
    row_block = pid // (n_chunks * N_GROUPS)
    rm = (row_block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
    rr = (chunk * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[None, :]
    rn = tl.arange(0, BLOCK_N).to(tl.int64)
    ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if NEED_DB:
        st = tl.load(s_ptr + rm * stride_sm + rr, mask=(rm < T) & (rr < R), other=0.0)
    first = group * GROUP_COLS
    for n0 in range(first, tl.minimum(first + GROUP_COLS, OUT), BLOCK_N):
        nn = n0 + rn
        dyt = tl.load(dy_ptr + rm * stride_dym + nn[None, :] * stride_dyn,
                      mask=(rm < T) & (nn[None, :] < OUT), other=0.0)
        if NEED_DS:
            bt = tl.load(b_ptr + nn[:, None] * stride_bn + rr * stride_br,
                         mask=(nn[:, None] < OUT) & (rr < R), other=0.0)
            ds = split_dot(dyt, bt, ds, NY, NB, ORDER, LT)
        if NEED_DB:
            part = split_dot(tl.trans(dyt), st, tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32),
                             NY, NS, ORDER, LT)
            tl.store(db_ptr + (row_block.to(tl.int64) * OUT + nn[:, None]) * R + rr, part * scaling,
                     mask=(nn[:, None] < OUT) & (rr < R))
    if NEED_DS:
        tl.store(ds_ptr + (group.to(tl.int64) * T + rm) * R + rr, ds * scaling, mask=(rm < T) & (rr < R))


@triton.autotune(configs=configs("da"), key=["T_KEY", "IN", "R", "HAS_DROPOUT"])
@triton.jit
def _da(
    ds_ptr, x_ptr, mask_ptr, da_ptr,
    inv_keep,
    T, IN, R, T_KEY, SPLIT_ROWS, N_SPLIT,
    stride_xm, stride_xk, stride_mm,
    HAS_DROPOUT: tl.constexpr, NX: tl.constexpr, NS: tl.constexpr, ORDER: tl.constexpr,
    LT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (column block, row chunk, rank chunk): da_part[split, chunk, cols] =
    (dropout(x[rows, cols])^T dS[rows, chunk])^T / (1 - p); partials (N_SPLIT, R, IN)."""
    pid = tl.program_id(0)
    n_chunks = tl.cdiv(R, BLOCK_R)
    chunk = pid % n_chunks
    split = (pid // n_chunks) % N_SPLIT
    pid_n = pid // (n_chunks * N_SPLIT)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)[None, :]
    rr = (chunk * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[None, :]
    rm = tl.arange(0, BLOCK_M).to(tl.int64)[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    first = split * SPLIT_ROWS
    for m0 in range(first, tl.minimum(first + SPLIT_ROWS, T), BLOCK_M):
        mm = m0 + rm
        xt = tl.load(x_ptr + mm * stride_xm + rn * stride_xk, mask=(mm < T) & (rn < IN), other=0.0)
        if HAS_DROPOUT:
            keep = load_keep(mask_ptr, stride_mm, mm, pid_n * (BLOCK_N // 8), T, IN, BLOCK_M, BLOCK_N)
            xt = tl.where(keep, xt, 0.0)
        dst = tl.load(ds_ptr + mm * R + rr, mask=(mm < T) & (rr < R), other=0.0)
        acc = split_dot(tl.trans(xt), dst, acc, NX, NS, ORDER, LT)
    if HAS_DROPOUT:
        acc = acc * inv_keep
    cols = tl.trans(rn)  # (BLOCK_N, 1)
    tl.store(da_ptr + (split * R + rr) * IN + cols, acc, mask=(cols < IN) & (rr < R))
