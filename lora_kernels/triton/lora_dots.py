"""Tile-level pieces shared by the LoRA kernels: tensor-core dots at fp32 accuracy, rounding.

Split-precision dots. PEFT keeps the adapters in fp32, and dA, dB (and S, dS, which feed them)
must come out fp32-accurate; ``tl.dot`` on fp32 operands either runs on the CUDA cores
(``ieee``: FFMA, 15x below the tensor cores) or rounds them to tf32 (11 significant bits).
Instead every fp32 operand is cut, by truncating its bits, into bf16 pieces that sum to it
exactly (8 + 8 + 8 significant bits); a bf16 operand is one piece, an fp16 one two. The dot is
the sum of the piece products whose order (piece index sum) is below ``ORDER``: each piece
product is exact in fp32 and accumulated in fp32 on the tensor cores (wgmma on sm_90).
``ORDER`` 3 leaves an error of a few fp32 ulps (fp32 outputs: S, dS, dA, dB), ``ORDER`` 2
about 2^-16 relative (bf16/fp16 outputs: y, dX). Half-precision adapters need none of this:
both operands are cast to the adapter dtype (as PEFT computes) and dotted once.

The LoRA dots are 2 r / (in + out) of a layer's FLOPs (0.4 % at r = 16, in = out = 4096), so
even three or six piece products cost little next to a base GEMM; on FFMA they would not.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRETER

_INTERP = tl.constexpr(INTERPRETER)
# Compute-type codes of a dot's pieces (constexpr LT): fp16 or bf16.
LT_FP16, LT_BF16 = 1, 2
_PIECES = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3}


def dot_plan(a_dtype: torch.dtype, b_dtype: torch.dtype, out_dtype: torch.dtype,
             adapter_dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(pieces of a, pieces of b, ORDER, LT) of a LoRA dot whose operands come in ``a_dtype``
    and ``b_dtype`` and whose result is stored in ``out_dtype``."""
    if adapter_dtype == torch.float16:
        return 1, 1, 1, LT_FP16
    if adapter_dtype == torch.bfloat16:
        return 1, 1, 1, LT_BF16
    order = 3 if out_dtype == torch.float32 else 2
    return _PIECES[a_dtype], _PIECES[b_dtype], order, LT_BF16


@triton.jit
def round_to(v, TY: tl.constexpr):
    """``v`` rounded to ``TY`` to nearest even (the interpreter's float32 -> bfloat16 cast
    truncates; there the rounding bias is added to the bits first)."""
    if v.dtype == TY:
        return v
    v = v.to(tl.float32)
    if TY == tl.float32:
        return v
    if _INTERP:
        if TY == tl.bfloat16:
            bits = v.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            v = bits.to(tl.float32, bitcast=True)
    return v.to(TY)


@triton.jit
def _top8(v):
    """The top 8 significant bits of fp32 ``v`` (a bf16 value, exact), as fp32."""
    return (v.to(tl.uint32, bitcast=True) & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def _piece(v):
    """A piece as the tensor cores take it (bf16; fp32 in the interpreter, whose bf16 dot is
    wrong: the value is exact either way)."""
    if _INTERP:
        return v
    return v.to(tl.bfloat16)


@triton.jit
def pieces(a, N: tl.constexpr, LT: tl.constexpr):
    """(p0, p1, p2): ``a`` as ``N`` pieces of compute type ``LT``, p0 + p1 + p2 == a (N = 3),
    most significant first; unused pieces repeat p0 and are never read."""
    if N == 1:
        if LT == 1:
            p0 = round_to(a, tl.float16)
        else:
            p0 = round_to(a, tl.bfloat16)
        if _INTERP:
            p0 = p0.to(tl.float32)
        p1 = p0
        p2 = p0
    else:  # (an early return above would still compile this branch: its type must not clash)
        a = a.to(tl.float32)
        h0 = _top8(a)
        r = a - h0
        h1 = _top8(r)
        p0 = _piece(h0)
        p1 = _piece(h1)
        p2 = _piece(r - h1)
    return p0, p1, p2


@triton.jit
def split_dot(a, b, acc, NA: tl.constexpr, NB: tl.constexpr, ORDER: tl.constexpr,
              LT: tl.constexpr):
    """acc + a @ b from the piece products of order < ORDER (see the module docstring),
    smallest first."""
    a0, a1, a2 = pieces(a, NA, LT)
    b0, b1, b2 = pieces(b, NB, LT)
    if ORDER > 2:
        if NA > 2:
            acc = tl.dot(a2, b0, acc)
        if NA > 1:
            if NB > 1:
                acc = tl.dot(a1, b1, acc)
        if NB > 2:
            acc = tl.dot(a0, b2, acc)
    if ORDER > 1:
        if NA > 1:
            acc = tl.dot(a1, b0, acc)
        if NB > 1:
            acc = tl.dot(a0, b1, acc)
    return tl.dot(a0, b0, acc)


@triton.jit
def wide_dot(a, b, acc, NA: tl.constexpr, LT: tl.constexpr):
    """acc + a @ [b0 | b1 | b2 | 0] for ``a`` (M, K) in ``NA`` pieces and ``b`` (K, N) in
    three, placed side by side (column 4 n + i is piece i of column n): one tensor-core dot of
    width 4 N per piece of ``a`` instead of one of width N per piece product (fewer
    instructions and waits; the tensor cores have time to spare). Every product of a piece of
    ``a`` with one of ``b`` is summed, those of order >= 3 too (below an fp32 ulp, and free).
    ``acc`` (M, 4 N) fp32; :func:`wide_sum` folds it to (M, N)."""
    b0, b1, b2 = pieces(b, 3, LT)
    K: tl.constexpr = b.shape[0]
    N: tl.constexpr = b.shape[1]
    # join(join(b0, b2), join(b1, 0))[.., a, t] is piece 2 a + t: in order once flattened
    wide = tl.reshape(tl.join(tl.join(b0, b2), tl.join(b1, tl.zeros_like(b1))), (K, 4 * N))
    a0, a1, a2 = pieces(a, NA, LT)
    if NA > 2:
        acc = tl.dot(a2, wide, acc)
    if NA > 1:
        acc = tl.dot(a1, wide, acc)
    return tl.dot(a0, wide, acc)


@triton.jit
def wide_sum(acc, M: tl.constexpr, N: tl.constexpr):
    """(M, 4 N) of :func:`wide_dot` -> (M, N): the piece products added, smallest first."""
    p0, p1, p2, _ = _split4(tl.reshape(acc, (M, N, 4)))
    return (p2 + p1) + p0


@triton.jit
def _split4(v):
    """(M, N, 4) -> its four (M, N) slices (the inverse of the joins in :func:`wide_dot`)."""
    low, high = tl.split(tl.reshape(v, (v.shape[0], v.shape[1], 2, 2)))  # [.., a, t]: by t
    p0, p2 = tl.split(low)
    p1, p3 = tl.split(high)
    return p0, p1, p2, p3


@triton.jit
def base_dot(a, b, acc):
    """acc + a @ b for the base GEMM's half-precision tiles (fp32 in the interpreter, whose
    bf16 dot is wrong)."""
    if _INTERP:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)
