"""Forward kernels of lora_linear (launched by :mod:`.lora_linear`).

``_shrink``    S = dropout(x) A^T / (1 - p), (T, r) fp32: one pass over x; the keep-mask is
               drawn here (one Philox call per 8 elements) and stored as bits beside S.
The GEMM y = bias + scaling S B^T + x W^T that follows is :mod:`.lora_gemm`. The shrink loops
over all of ``in`` per program (no split-K: T / BLOCK_M row blocks times the rank chunks are
enough programs at the sizes where it matters, 128 at T = 8192).

The shrink is the one kernel bound by issue slots rather than bytes (the mask is integer work
on the CUDA cores), so its loop is written for few instructions per element of x: with a
16-bit x (``PAIRS``) x is read as 32-bit pairs and each pair is masked by one AND with the
pair's keep mask (:mod:`.lora_dropout`); the loop's loads carry no bounds masks (rows and
ranks past the end are clamped, the last partial column block is a separate, masked step);
a bf16 x against fp32 adapters takes one dot of width 4 r (:func:`.lora_dots.wide_dot`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import _common
from ._common import INTERPRETER
from .lora_dots import split_dot, wide_dot, wide_sum
from .lora_dropout import keep_halfwords, keep_masks, pair_masks


def _cfg(bm, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


def launch_class(NX, BLOCK_R, **_) -> str:
    """"split": x in several pieces (fp16/fp32 base under fp32 adapters; BLOCK_R 16 then),
    "r64": 64 ranks per program, "base": the rest."""
    return "split" if NX > 1 else ("r64" if BLOCK_R > 32 else "base")


# 64-row blocks fill an H200 at T = 8192 (128 programs); 8 warps on them give each scheduler
# two warps to switch between (the loop is issue-bound: Philox on the CUDA cores).
_BASE = [_cfg(64, 64, 4, 4), _cfg(64, 128, 4, 3), _cfg(128, 64, 8, 3), _cfg(64, 64, 4, 2),
         _cfg(64, 128, 8, 2)]
_NARROW = [_BASE[0], _BASE[2], _BASE[3]]  # BLOCK_K 128 spills with 64 ranks or a split x
# Each config compiles for sm_90 without spills, with wgmma in every dot, for its class.
CONFIGS = _common.ConfigTable(
    {"base": _BASE, "r64": _NARROW, "split": _NARROW} if not INTERPRETER
    else dict.fromkeys(("base", "r64", "split"), [_cfg(16, 32, 4, 1)]),
    launch_class)


@triton.jit
def _dropped_x(x_rows, k0, rm, T, IN, stride_xk, seed_lo, seed_hi, thr, mask_rows, store,
               XT: tl.constexpr, HAS_DROPOUT: tl.constexpr, PAIRS: tl.constexpr,
               EDGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """dropout(x) (without the 1 / (1 - p)) of rows rm (BM, 1) and columns k0 .. k0 + BLOCK_K - 1
    (zero past ``IN`` with ``EDGE``), in x's dtype ``XT``; with ``store``, the keep bits go to
    ``mask_rows`` (int16 pointers to the rows' mask words). ``x_rows``: pointers to the
    rows (clamped below T), to 32-bit pairs with ``PAIRS``."""
    kk = k0 + tl.arange(0, BLOCK_K)[None, :]
    if HAS_DROPOUT:
        g = k0 // 8 + tl.arange(0, BLOCK_K // 8)[None, :]
        m0, m1, m2, m3 = keep_masks(seed_lo, seed_hi, thr, rm, g)
        if store:
            ok = rm < T
            if EDGE:
                ok = ok & (g < 2 * tl.cdiv(IN, 16))
            # The column offset times an opaque 1 (thr < 2**17): the store then keeps the
            # layout the halfwords are computed in, one 16-bit store per Philox call, rather
            # than be vectorised through a shared-memory exchange (barriers in the loop).
            tl.store(mask_rows + g * (1 + (thr >> 17)), keep_halfwords(m0, m1, m2, m3, g),
                     mask=ok)
        keep = pair_masks(m0, m1, m2, m3, BLOCK_M, BLOCK_K)
        if PAIRS:  # one AND per pair of 16-bit elements
            kw = k0 // 2 + tl.arange(0, BLOCK_K // 2)[None, :]
            if EDGE:
                xw = tl.load(x_rows + kw, mask=kw < IN // 2, other=0)
            else:
                xw = tl.load(x_rows + kw)
            xw = xw & keep
            lo = xw.to(tl.uint16).to(XT, bitcast=True)
            hi = (xw >> 16).to(tl.uint16).to(XT, bitcast=True)
            xt = tl.reshape(tl.join(lo, hi), (BLOCK_M, BLOCK_K))
        else:
            xt = _load_x(x_rows, kk, IN, stride_xk, EDGE)
            kept = tl.reshape(tl.join((keep & 1) != 0, (keep >> 16) != 0), (BLOCK_M, BLOCK_K))
            xt = tl.where(kept, xt, tl.zeros_like(xt))
    else:
        xt = _load_x(x_rows, kk, IN, stride_xk, EDGE)
    return xt


@triton.jit
def _load_x(x_rows, kk, IN, stride_xk, EDGE: tl.constexpr):
    if EDGE:
        xt = tl.load(x_rows + kk * stride_xk, mask=kk < IN, other=0.0)
    else:
        xt = tl.load(x_rows + kk * stride_xk)
    return xt


@triton.jit
def _step(acc, x_rows, a_cols, k0, rm, T, IN, stride_xk, stride_ak, seed_lo, seed_hi, thr,
          mask_rows, store, XT: tl.constexpr, HAS_DROPOUT: tl.constexpr, PAIRS: tl.constexpr,
          EDGE: tl.constexpr, WIDE: tl.constexpr, NX: tl.constexpr, NA: tl.constexpr,
          ORDER: tl.constexpr, LT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + dropout(x[rows, k0 : k0 + BLOCK_K]) A[chunk, k0 : k0 + BLOCK_K]^T (into the wide
    accumulator of :func:`.lora_dots.wide_dot` with ``WIDE``)."""
    xt = _dropped_x(x_rows, k0, rm, T, IN, stride_xk, seed_lo, seed_hi, thr, mask_rows, store,
                    XT, HAS_DROPOUT, PAIRS, EDGE, BLOCK_M, BLOCK_K)
    kk = k0 + tl.arange(0, BLOCK_K)[:, None]
    if EDGE:
        at = tl.load(a_cols + kk * stride_ak, mask=kk < IN, other=0.0)
    else:
        at = tl.load(a_cols + kk * stride_ak)
    if WIDE:
        acc = wide_dot(xt, at, acc, NX, LT)
    else:
        acc = split_dot(xt, at, acc, NX, NA, ORDER, LT)
    return acc


@triton.autotune(configs=CONFIGS.all(), key=["T_KEY", "IN", "R", "HAS_DROPOUT", "PAIRS"],
                 prune_configs_by={"early_config_prune": CONFIGS.prune})
@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "thr"])
def _shrink(
    x_ptr, a_ptr, s_ptr, mask_ptr,
    seed_lo, seed_hi, thr, inv_keep,
    T, IN, R, T_KEY,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_sm, stride_mm,
    HAS_DROPOUT: tl.constexpr, PAIRS: tl.constexpr, NX: tl.constexpr, NA: tl.constexpr,
    ORDER: tl.constexpr, LT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """S[rows, chunk] = dropout(x[rows]) A[chunk]^T / (1 - p) for one row block and one chunk
    of BLOCK_R ranks; the chunk-0 program stores the keep bits of its rows (``mask_ptr``:
    int16 view of the mask words, ``stride_mm`` per row). ``PAIRS``: x is 16-bit with unit
    column stride, even row stride and even ``IN``, read as 32-bit pairs."""
    pid = tl.program_id(0)
    n_chunks = tl.cdiv(R, BLOCK_R)
    chunk = pid % n_chunks
    rm = ((pid // n_chunks) * BLOCK_M + tl.arange(0, BLOCK_M))[:, None]
    rr = (chunk * BLOCK_R + tl.arange(0, BLOCK_R))[None, :]
    # loads of rows / ranks past the end read the last one (never stored): no bounds masks
    row_at = tl.minimum(rm, T - 1).to(tl.int64)
    if PAIRS:
        x_rows = x_ptr.to(tl.pointer_type(tl.uint32)) + row_at * (stride_xm // 2)
    else:
        x_rows = x_ptr + row_at * stride_xm
    a_cols = a_ptr + tl.minimum(rr, R - 1).to(tl.int64) * stride_ar
    mask_rows = mask_ptr + rm.to(tl.int64) * stride_mm
    store = chunk == 0
    XT: tl.constexpr = x_ptr.dtype.element_ty
    # one dot per piece of x over A's three pieces side by side (up to 32 ranks: a 64-rank
    # chunk would need a 64 x 256 accumulator)
    WIDE: tl.constexpr = NA == 3 and ORDER == 3 and BLOCK_R <= 32
    if WIDE:
        acc = tl.zeros((BLOCK_M, 4 * BLOCK_R), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    k_full = IN - IN % BLOCK_K
    for k0 in range(0, k_full, BLOCK_K):
        acc = _step(acc, x_rows, a_cols, k0, rm, T, IN, stride_xk, stride_ak, seed_lo, seed_hi,
                    thr, mask_rows, store, XT, HAS_DROPOUT, PAIRS, False, WIDE, NX, NA, ORDER, LT,
                    BLOCK_M, BLOCK_K)
    if k_full < IN:
        acc = _step(acc, x_rows, a_cols, k_full, rm, T, IN, stride_xk, stride_ak, seed_lo,
                    seed_hi, thr, mask_rows, store, XT, HAS_DROPOUT, PAIRS, True, WIDE, NX, NA,
                    ORDER, LT, BLOCK_M, BLOCK_K)
    if WIDE:
        acc = wide_sum(acc, BLOCK_M, BLOCK_R)
    if HAS_DROPOUT:
        acc = acc * inv_keep
    tl.store(s_ptr + rm.to(tl.int64) * stride_sm + rr, acc, mask=(rm < T) & (rr < R))
