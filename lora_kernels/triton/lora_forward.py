"""Forward kernels of lora_linear (launched by :mod:`.lora_linear`).

``_shrink``    S = dropout(x) A^T / (1 - p), (T, r) fp32: one pass over x; the keep-mask is
               drawn here (one Philox call per 8 elements) and stored as bits beside S.
The GEMM y = bias + scaling S B^T + x W^T that follows is :mod:`.lora_gemm`. The shrink loops
over all of ``in`` per program (no split-K: T / BLOCK_M row blocks times the rank chunks are
enough programs at the sizes where it matters, 128 at T = 8192).
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import _common
from ._common import INTERPRETER
from .lora_dots import split_dot
from .lora_dropout import expand_bits, keep_bytes, store_bytes


def _cfg(bm, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


def launch_class(NX, BLOCK_R, **_) -> str:
    """"split": x in several pieces (fp16/fp32 base under fp32 adapters; BLOCK_R 16 then),
    "r64": 64 ranks per program, "base": the rest."""
    return "split" if NX > 1 else ("r64" if BLOCK_R > 32 else "base")


_BASE = [_cfg(64, 64, 4, 4), _cfg(64, 128, 4, 3), _cfg(128, 64, 8, 3), _cfg(64, 64, 4, 2)]
_NARROW = [_BASE[0], _BASE[2], _BASE[3]]  # BLOCK_K 128 spills with 64 ranks or a split x
# Each config compiles for sm_90 without spills, with wgmma in every dot, for its class.
CONFIGS = _common.ConfigTable(
    {"base": _BASE, "r64": _NARROW, "split": _NARROW} if not INTERPRETER
    else dict.fromkeys(("base", "r64", "split"), [_cfg(16, 32, 4, 1)]),
    launch_class)


@triton.autotune(configs=CONFIGS.all(), key=["T_KEY", "IN", "R", "HAS_DROPOUT"],
                 prune_configs_by={"early_config_prune": CONFIGS.prune})
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
    of BLOCK_R ranks; the chunk-0 program stores the keep words of its rows."""
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
            ok = (rm < T) & (g < 2 * tl.cdiv(IN, 16)) & (chunk == 0)
            store_bytes(mask_ptr, stride_mm, rm, g, b, ok)
            xt = tl.where(expand_bits(b, BLOCK_M, BLOCK_K, 8), xt, 0.0)
        at = tl.load(a_ptr + rr * stride_ar + kk[:, None] * stride_ak,
                     mask=(rr < R) & (kk[:, None] < IN), other=0.0)
        acc = split_dot(xt, at, acc, NX, NA, ORDER, LT)
    if HAS_DROPOUT:
        acc = acc * inv_keep
    tl.store(s_ptr + rm * stride_sm + rr, acc, mask=(rm < T) & (rr < R))
