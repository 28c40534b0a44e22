"""Backward kernels of lora_linear (launched by :mod:`.lora_linear`). No atomics: every
reduction that spans programs writes fp32 partials that the launcher sums in a fixed order.

``_ds_db``  one pass over dY for both dS = scaling dY B (T, r) and dB = scaling dY^T S (out, r).
            Program (row block i, column group j) reads dY[i, j]: its dS partial (over j's
            columns) goes to ``ds_part[j]``, its dB rows (over i's rows) to ``db_part[i]``.
            Block rows and column groups are the launcher's (not autotuned), so the partial
            buffers and the summation order depend on the shape only.
``_da``     dA = dS^T dropout(x) / (1 - p): one pass over x, rows split into ``n_split``
            chunks whose (r, in) partials the launcher sums. Used above rank 32 or when x needs
            no gradient; otherwise dA rides in the dX GEMM (:mod:`.lora_gemm`).
Both read the keep bits the forward stored; neither runs Philox.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import _common
from ._common import INTERPRETER
from .lora_dots import split_dot
from .lora_dropout import load_keep

# dA row chunks and dS/dB column groups are multiples of these (of every BLOCK_M / BLOCK_N a
# config may pick; smaller in the interpreter, whose tests use small shapes).
ROW_QUANTUM = 32 if INTERPRETER else 256
COL_QUANTUM = 64 if INTERPRETER else 256


def launch_class(BLOCK_R, NY=None, NX=None, **_) -> str:
    """"split": dY or x in several pieces (fp16/fp32 base under fp32 adapters; BLOCK_R 16 and,
    for _ds_db, BLOCK_M 64 then), "r64": 64 ranks per program, "base": the rest."""
    return "split" if (NY or NX) > 1 else ("r64" if BLOCK_R > 32 else "base")


def _ds_db_cfg(bn, warps, stages):
    return triton.Config({"BLOCK_N": bn}, num_warps=warps, num_stages=stages)


def _da_cfg(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# Each config compiles for sm_90 without spills, with wgmma in every dot, for its class (so
# every dot's M is at least 64: BLOCK_M for dS, BLOCK_N for dB and dA).
if INTERPRETER:
    _CLASSES = ("base", "r64", "split")
    DS_DB_CONFIGS = _common.ConfigTable(dict.fromkeys(_CLASSES, [_ds_db_cfg(32, 4, 1)]),
                                        launch_class)
    DA_CONFIGS = _common.ConfigTable(dict.fromkeys(_CLASSES, [_da_cfg(32, 32, 4, 1)]), launch_class)
else:
    _w = [_ds_db_cfg(64, 8, 3), _ds_db_cfg(128, 8, 3), _ds_db_cfg(64, 4, 4)]
    DS_DB_CONFIGS = _common.ConfigTable(
        {"base": _w, "r64": _w[:1], "split": [_ds_db_cfg(64, 4, 3)]}, launch_class)
    _a = [_da_cfg(64, 128, 4, 3), _da_cfg(128, 128, 8, 3), _da_cfg(64, 64, 4, 4)]
    DA_CONFIGS = _common.ConfigTable({"base": _a, "r64": _a, "split": [_a[0], _a[2]]}, launch_class)


@triton.autotune(configs=DS_DB_CONFIGS.all(), key=["T_KEY", "OUT", "R", "NEED_DS", "NEED_DB"],
                 prune_configs_by={"early_config_prune": DS_DB_CONFIGS.prune})
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
        tl.store(ds_ptr + (group.to(tl.int64) * T + rm) * R + rr, ds * scaling,
                 mask=(rm < T) & (rr < R))


@triton.autotune(configs=DA_CONFIGS.all(), key=["T_KEY", "IN", "R", "HAS_DROPOUT"],
                 prune_configs_by={"early_config_prune": DA_CONFIGS.prune})
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
            keep = load_keep(mask_ptr, stride_mm, mm, pid_n * (BLOCK_N // 16), T, IN,
                             BLOCK_M, BLOCK_N)
            xt = tl.where(keep, xt, 0.0)
        dst = tl.load(ds_ptr + mm * R + rr, mask=(mm < T) & (rr < R), other=0.0)
        acc = split_dot(tl.trans(xt), dst, acc, NX, NS, ORDER, LT)
    if HAS_DROPOUT:
        acc = acc * inv_keep
    cols = tl.trans(rn)  # (BLOCK_N, 1)
    tl.store(da_ptr + (split * R + rr) * IN + cols, acc, mask=(cols < IN) & (rr < R))
