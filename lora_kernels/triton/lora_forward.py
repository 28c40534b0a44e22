"""Forward kernels of lora_linear (launched by :mod:`.lora_linear`).

``_shrink``    S = dropout(x) A^T / (1 - p), (T, r) fp32: one pass over x; the keep-mask is
               drawn here (one Philox call per 8 elements) and stored as bits beside S.
``_fwd_gemm``  Y = bias + scaling S B^T + x W^T: the LoRA term seeds the fp32 accumulator of
               the base GEMM (``HAS_BASE``), so it never exists in memory on its own; without
               ``HAS_BASE`` the kernel writes bias + LoRA term only and cuBLAS adds x W^T onto it.

Both loop over all of their reduction axis per tile (no split-K: x's rows give T / BLOCK_M
programs times the rank chunks, and the GEMM's tiles are T / BLOCK_M * out / BLOCK_N).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import INTERPRETER
from .lora_dots import base_dot, grouped_pid, round_to, split_dot
from .lora_dropout import expand_bits, keep_bytes


def configs(kernel: str) -> list[triton.Config]:
    """Autotune configurations of ``_shrink`` / ``_fwd_gemm`` (one small one in the
    interpreter). Every one compiles for sm_90 without spills, with wgmma in every dot."""
    if INTERPRETER:
        one = {"shrink": {"BLOCK_M": 16, "BLOCK_K": 32},
               "fwd": {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}}[kernel]
        return [triton.Config(one, num_warps=4, num_stages=1)]
    if kernel == "shrink":
        return [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=st)
                for bm, bk, w, st in [(64, 64, 4, 4), (64, 128, 4, 3), (128, 64, 8, 3),
                                      (64, 64, 4, 2)]]
    if kernel == "fwd":
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                              num_warps=w, num_stages=st)
                for bm, bn, bk, w, st in [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4),
                                          (128, 128, 64, 4, 4), (64, 128, 64, 4, 4)]]
    raise KeyError(kernel)


@triton.autotune(configs=configs("shrink"), key=["T_KEY", "IN", "R", "HAS_DROPOUT"])
@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "thr"])
def _shrink(
    x_ptr, a_ptr, s_ptr, mask_ptr,
    seed_lo, seed_hi, thr, inv_keep,
    T, IN, R, T_KEY,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_sm, stride_mm,
    HAS_DROPOUT: tl.constexpr, NX: tl.constexpr, NA: tl.constexpr, ORDER: tl.constexpr,
    LT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """S[rows, chunk] = dropout(x[rows]) A[chunk]^T / (1 - p) for one row block and one chunk
    of BLOCK_R ranks; the chunk-0 program stores the keep bytes of its rows."""
    pid = tl.program_id(0)
    n_chunks = tl.cdiv(R, BLOCK_R)
    chunk = pid % n_chunks
    rm = ((pid // n_chunks) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
    rr = (chunk * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[None, :]
    rk = tl.arange(0, BLOCK_K).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, IN, BLOCK_K):
        kk = k0 + rk
        xt = tl.load(x_ptr + rm * stride_xm + kk[None, :] * stride_xk,
                     mask=(rm < T) & (kk[None, :] < IN), other=0.0)
        if HAS_DROPOUT:
            g = k0 // 8 + tl.arange(0, BLOCK_K // 8)[None, :]
            b = keep_bytes(seed_lo, seed_hi, thr, rm, g)
            tl.store(mask_ptr + rm * stride_mm + g, b.to(tl.uint8),
                     mask=(rm < T) & (g < tl.cdiv(IN, 8)) & (chunk == 0))
            xt = tl.where(expand_bits(b, BLOCK_M, BLOCK_K), xt, 0.0)
        at = tl.load(a_ptr + rr * stride_ar + kk[:, None] * stride_ak,
                     mask=(rr < R) & (kk[:, None] < IN), other=0.0)
        acc = split_dot(xt, at, acc, NX, NA, ORDER, LT)
    if HAS_DROPOUT:
        acc = acc * inv_keep
    tl.store(s_ptr + rm * stride_sm + rr, acc, mask=(rm < T) & (rr < R))


@triton.autotune(configs=configs("fwd"), key=["T_KEY", "IN", "OUT", "R", "HAS_BASE"])
@triton.jit
def _fwd_gemm(
    x_ptr, w_ptr, bias_ptr, s_ptr, b_ptr, y_ptr,
    scaling,
    T, IN, OUT, R, T_KEY,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sm, stride_bn, stride_br,
    stride_ym, stride_yn, stride_bias,
    HAS_BIAS: tl.constexpr, HAS_BASE: tl.constexpr, NS: tl.constexpr, NB: tl.constexpr,
    ORDER: tl.constexpr, LT: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Y[tile] = bias + scaling S B^T (+ x W^T with HAS_BASE), fp32 accumulation."""
    pid_m, pid_n = grouped_pid(T, OUT, BLOCK_M, BLOCK_N, GROUP_M)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)[None, :]
    rr = tl.arange(0, BLOCK_R).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        kr = r0 + rr
        st = tl.load(s_ptr + rm * stride_sm + kr[None, :], mask=(rm < T) & (kr[None, :] < R),
                     other=0.0)
        bt = tl.load(b_ptr + rn * stride_bn + kr[:, None] * stride_br,
                     mask=(rn < OUT) & (kr[:, None] < R), other=0.0)
        acc = split_dot(st, bt, acc, NS, NB, ORDER, LT)
    acc = acc * scaling
    if HAS_BASE:
        rk = tl.arange(0, BLOCK_K).to(tl.int64)
        for k0 in range(0, IN, BLOCK_K):
            kk = k0 + rk
            xt = tl.load(x_ptr + rm * stride_xm + kk[None, :] * stride_xk,
                         mask=(rm < T) & (kk[None, :] < IN), other=0.0)
            wt = tl.load(w_ptr + rn * stride_wn + kk[:, None] * stride_wk,
                         mask=(rn < OUT) & (kk[:, None] < IN), other=0.0)
            acc = base_dot(xt, wt, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn * stride_bias, mask=rn < OUT, other=0.0).to(tl.float32)
    tl.store(y_ptr + rm * stride_ym + rn * stride_yn, round_to(acc, y_ptr.dtype.element_ty),
             mask=(rm < T) & (rn < OUT))
