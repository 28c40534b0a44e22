"""lora_linear in Triton: ``y = x W^T + b + scaling * dropout(x) A^T B^T`` (the design is in
docs/ARCHITECTURE.md; the static sm_90 profile and traffic model in benchmarks/README.md).

Per training step (T tokens, in -> out, rank r, dropout p), kernels by :data:`KERNELS` name:

forward   ``shrink``  one pass over x: the keep-mask (one Philox call per 8 elements, stored
                      as bits in extra columns of the saved ``s``) and S = dropout(x) A^T.
          ``fwd``     y = bias + scaling S B^T + x W^T: the LoRA term seeds the fp32
                      accumulator of a persistent, TMA-fed GEMM (:mod:`.lora_gemm`).
backward  ``ds_db``   one pass over dY: dS = scaling dY B and dB = scaling dY^T S (split
                      partials, summed in a fixed order).
          ``dx``      dX = dY W + keep * (dS A) / (1 - p), the same GEMM with the masked LoRA
                      term seeding it; up to r = 32 it also reads x's tile and writes dA's
                      partials (dA = dS^T dropout(x) / (1 - p)).
          ``da``      above r = 32, or when x needs no gradient: dA in its own pass over x.
          dW = dY^T x and db = sum(dY) (only when asked for) are cuBLAS calls through torch.

Passes over (T, in) / (T, out) activations beyond the two base GEMMs: x once (shrink; dA's
read of x rides inside the compute-bound dX GEMM), dY once (dS/dB), the mask words (1/8 of a
bf16 x) written once and read once (twice when dA takes its own pass). No atomics anywhere.

Base GEMMs: fused in Triton for fp16/bf16 (:data:`TRITON_BASE_DTYPES`). The alternative,
cuBLAS with beta = 1 onto a buffer already holding bias + LoRA term (``y.addmm_(x, W^T)``),
needs that buffer written by a kernel of its own, forward and for dX: 128 MiB of writes at
T = 8192, in = out = 4096 in bf16 (28 us at 4.8 TB/s, 5 % of the two base GEMMs' modelled
556 us; the GEMMs' reads of it ride along their compute), against 3 GFLOP of LoRA prologue per
fused GEMM (3 us). So the fused GEMM wins as long as it is within about 4 % of cuBLAS. fp32
bases take the cuBLAS route (this kernel's prologue-only mode, then ``addmm_``): tensor cores
would need an fp32 emulation in the mainloop, and cuBLAS follows ``torch.backends``' TF32
setting as ``F.linear`` does.

LoRA dots: split-precision bf16 pieces on the tensor cores (see :mod:`.lora_dots`).
Backend contract: ``forward``, ``backward``, ``not_supported_reasons`` (see the op), plus
:func:`saved_s_columns` (the width of the saved ``s``, which carries the mask).
"""

from __future__ import annotations

import torch
import triton

from ..backends import Capabilities
from ._common import INTERPRETER, device_guard, num_sms, pow2_bucket
from .lora_backward import COL_QUANTUM, ROW_QUANTUM, _da, _ds_db
from .lora_dots import dot_plan
from .lora_dropout import mask_columns, saved_s_columns, seed_words, threshold
from .lora_forward import _shrink
from .lora_gemm import DA_BLOCK_M, descriptor, dx_gemm, fwd_gemm, tma_ok

__all__ = ["forward", "backward", "not_supported_reasons", "saved_s_columns", "KERNELS"]

MAX_RANK = 256
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Base dtypes whose GEMMs run inside the fused Triton kernels; the others go to cuBLAS.
TRITON_BASE_DTYPES = (torch.float16, torch.bfloat16)
# Largest rank whose dA is computed inside the dX GEMM (see _backward).
FUSE_DA_MAX_RANK = 32
# Every kernel of this backend by name.
KERNELS = {"shrink": _shrink, "fwd": fwd_gemm, "ds_db": _ds_db, "dx": dx_gemm, "da": _da}
_F32 = torch.float32


def _block_r(r: int, pieces: int) -> int:
    """Ranks per program: one chunk up to 64, chunks of 64 above; chunks of 16 when the
    activation (x or dY) is split into several pieces (registers)."""
    return 16 if pieces > 1 else min(64, max(16, triton.next_power_of_2(r)))


def _ds_db_block_m(T: int, pieces: int) -> int:
    """Rows per dS/dB program (fixed by the launcher, so the partials depend on the shape only):
    more rows mean fewer dB partials, fewer mean more programs (and fewer registers)."""
    if INTERPRETER:
        return 16
    return 128 if T >= 4096 and pieces == 1 else 64


def _pairs_ok(x: torch.Tensor) -> bool:
    """Whether the shrink may read x (T, in) as 32-bit pairs of 16-bit elements."""
    return (x.element_size() == 2 and x.stride(1) == 1 and x.stride(0) % 2 == 0
            and x.shape[1] % 2 == 0 and x.data_ptr() % 4 == 0)


def _plan(names, plan):
    return dict(zip(names, plan))


def forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    """x (T, in); weight (out, in); bias (out,) or None; lora_A (r, in); lora_B (out, r)
    -> (y (T, out) in x's dtype, s (T, saved_s_columns(in, r, p)) float32: S, then the mask)."""
    with device_guard(x):
        return _forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)


def _forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    T, IN = x.shape
    OUT, R = weight.shape[0], lora_A.shape[0]
    p, adt = float(dropout_p), lora_A.dtype
    s = torch.empty(T, saved_s_columns(IN, R, p), device=x.device, dtype=_F32)
    y = torch.empty(T, OUT, device=x.device, dtype=x.dtype)
    if T == 0:
        return y, s
    seed_lo, seed_hi = seed_words(seed)
    t_key = pow2_bucket(T)
    mask = s[:, mask_columns(IN, R)[0]:].view(torch.int16) if p > 0 else s
    plan = dot_plan(x.dtype, adt, _F32, adt)
    block_r = _block_r(R, plan[0])
    n_chunks = triton.cdiv(R, block_r)
    _shrink[lambda m: (triton.cdiv(T, m["BLOCK_M"]) * n_chunks,)](
        x, lora_A, s, mask, seed_lo, seed_hi, threshold(p), 1.0 / (1.0 - p),
        T, IN, R, t_key,
        x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), s.stride(0), mask.stride(0),
        HAS_DROPOUT=p > 0, PAIRS=p > 0 and _pairs_ok(x), BLOCK_R=block_r,
        **_plan(("NX", "NA", "ORDER", "LT"), plan),
    )
    if OUT == 0:
        return y, s
    fused = x.dtype in TRITON_BASE_DTYPES
    _gemm(fwd_gemm, x, weight.t(), s, lora_B.t(), None, bias, y, float(scaling), R, t_key, fused,
          dot_plan(_F32, adt, x.dtype, adt))
    if not fused:
        y.addmm_(x, weight.t())
    return y, s


def backward(dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed, needs):
    """Gradients ``(dx, dweight, dbias, dA, dB)`` for ``needs`` (x, weight, bias, lora_A,
    lora_B), None where not needed; dweight (out, in) in the layout ``weight`` was passed."""
    with device_guard(x):
        return _backward(dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed, needs)


def _backward(dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed, needs):
    need_x, need_w, need_b, need_a, need_bb = (bool(n) for n in needs)
    (T, IN), R = x.shape, lora_A.shape[0]
    dev, adt, p = x.device, lora_A.dtype, float(dropout_p)
    dw = torch.mm(dy.t(), x) if need_w else None
    db = dy.sum(0) if need_b else None
    if T == 0:
        dx = torch.empty(0, IN, device=dev, dtype=x.dtype) if need_x else None
        dA = torch.zeros_like(lora_A) if need_a else None
        dB = torch.zeros_like(lora_B) if need_bb else None
        return dx, dw, db, dA, dB
    t_key = pow2_bucket(T)
    mask = s[:, mask_columns(IN, R)[0]:] if p > 0 else s
    ds, dB = _grad_s_and_b(dy, lora_B, s, scaling, need_x or need_a, need_bb, t_key)
    dx = dA = None
    # dA inside the dX GEMM (its (T / DA_BLOCK_M, r, in) partials cost less than a pass over x
    # up to r = 32), else its own pass over x (also when a half x is split in pieces beside
    # the base mainloop: registers).
    fused = x.dtype in TRITON_BASE_DTYPES
    da_plan = dot_plan(x.dtype, _F32, adt, adt)
    fuse_da = (need_x and need_a and R <= FUSE_DA_MAX_RANK and IN > 0
               and (da_plan[0] == 1 or not fused))
    if need_x:
        dx = torch.empty(T, IN, device=dev, dtype=x.dtype)
        part = None
        if fuse_da:
            part = torch.empty(triton.cdiv(T, DA_BLOCK_M), R, IN, device=dev, dtype=_F32)
        if IN > 0:
            _gemm(dx_gemm, dy, weight, ds, lora_A, mask if p > 0 else None, None, dx,
                  1.0 / (1.0 - p), R, t_key, fused, dot_plan(_F32, adt, x.dtype, adt),
                  x=x if fuse_da else None, da=part, da_plan=da_plan)
            if not fused:
                dx.addmm_(dy, weight)
        if fuse_da:
            dA = (part[0] if part.shape[0] == 1 else part.sum(0)).to(adt)
    if need_a and not fuse_da:
        dA = _grad_a(ds, x, mask, p, adt, t_key)
    return dx, dw, db, dA, dB


def _grad_s_and_b(dy, lora_B, s, scaling, need_ds, need_db, t_key):
    """dS (T, r) fp32 (None if not needed) and dB (out, r) in the adapter dtype (or None), from
    one launch of ``_ds_db``."""
    T, OUT = dy.shape
    R, dev, adt = lora_B.shape[1], dy.device, lora_B.dtype
    if not (need_ds or need_db):
        return None, None
    plan = dot_plan(dy.dtype, adt, _F32, adt)
    block_r, block_m = _block_r(R, plan[0]), _ds_db_block_m(T, plan[0])
    n_chunks, row_blocks = triton.cdiv(R, block_r), triton.cdiv(T, block_m)
    # Column groups (multiples of COL_QUANTUM columns): enough programs for two waves, no more
    # (each group adds a (T, r) dS partial).
    n_groups = min(triton.cdiv(2 * num_sms(dev), row_blocks * n_chunks),
                   triton.cdiv(OUT, COL_QUANTUM))
    group_cols = triton.cdiv(triton.cdiv(OUT, max(n_groups, 1)), COL_QUANTUM) * COL_QUANTUM
    n_groups = max(1, triton.cdiv(OUT, max(group_cols, 1)))
    ds_part = torch.empty(n_groups if need_ds else 0, T, R, device=dev, dtype=_F32)
    db_part = torch.empty(row_blocks if need_db else 0, OUT, R, device=dev, dtype=_F32)
    _ds_db[(row_blocks * n_groups * n_chunks,)](
        dy, lora_B, s, ds_part, db_part, float(scaling), T, OUT, R, t_key, group_cols, n_groups,
        dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1), s.stride(0),
        NEED_DS=need_ds, NEED_DB=need_db, BLOCK_R=block_r, BLOCK_M=block_m,
        NS=dot_plan(dy.dtype, _F32, _F32, adt)[1], **_plan(("NY", "NB", "ORDER", "LT"), plan),
    )
    ds = (ds_part[0] if n_groups == 1 else ds_part.sum(0)) if need_ds else None
    dB = (db_part[0] if row_blocks == 1 else db_part.sum(0)).to(adt) if need_db else None
    return ds, dB


def _grad_a(ds, x, mask, p, adt, t_key):
    """dA (r, in) in the adapter dtype from one launch of ``_da``: row chunks (multiples of
    ROW_QUANTUM rows) so that column blocks times chunks fill the GPU twice over, their
    (n_split, r, in) fp32 partials summed in a fixed order."""
    (T, IN), R = x.shape, ds.shape[1]
    plan = dot_plan(x.dtype, _F32, adt, adt)
    block_r = _block_r(R, plan[0])
    n_chunks, n_cols = triton.cdiv(R, block_r), triton.cdiv(IN, 64)
    n_split = min(triton.cdiv(2 * num_sms(x.device), n_cols * n_chunks),
                  triton.cdiv(T, ROW_QUANTUM))
    split_rows = triton.cdiv(triton.cdiv(T, n_split), ROW_QUANTUM) * ROW_QUANTUM
    n_split = triton.cdiv(T, split_rows)
    part = torch.empty(n_split, R, IN, device=x.device, dtype=_F32)
    if IN > 0:
        _da[lambda m: (triton.cdiv(IN, m["BLOCK_N"]) * n_split * n_chunks,)](
            ds, x, mask, part, 1.0 / (1.0 - p), T, IN, R, t_key, split_rows, n_split,
            x.stride(0), x.stride(1), mask.stride(0),
            HAS_DROPOUT=p > 0, BLOCK_R=block_r, **_plan(("NX", "NS", "ORDER", "LT"), plan),
        )
    return (part[0] if n_split == 1 else part.sum(0)).to(adt)


def _gemm(kernel, a, bmat, p, q, mask, bias, c, factor, R, t_key, has_base, plan, x=None, da=None,
          da_plan=(1, 1, 1, 1)):
    """c = bias + keep * factor * (p[:, :R] q) (+ a bmat with ``has_base``): a (M, K),
    bmat (K, N), p (M, >= R) fp32 with unit column stride, q (R, N); see :mod:`.lora_gemm`.
    With ``x`` (M, N) and ``da`` (M / DA_BLOCK_M, R, N) fp32, also dA's partials.
    TMA descriptors when a's rows and bmat are 16-byte aligned with a unit stride."""
    M, N = c.shape
    K = a.shape[1]
    use_tma = has_base and a.stride(1) == 1 and tma_ok(a) and tma_ok(bmat)
    b_kmajor = bmat.stride(0) == 1 and bmat.stride(1) != 1
    if use_tma:
        a_arg, b_arg = descriptor(a, False), descriptor(bmat, b_kmajor)
    else:
        a_arg, b_arg = a, bmat
    sms = num_sms(c.device)
    fuse_da = da is not None
    kernel[lambda m: (min(triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"]), sms),)](
        a_arg, b_arg, p, q, mask if mask is not None else p, bias if bias is not None else c, c,
        x if fuse_da else c, da if fuse_da else c,
        factor, M, N, K, R, t_key,
        a.stride(0), a.stride(1), bmat.stride(0), bmat.stride(1), p.stride(0),
        q.stride(0), q.stride(1), mask.stride(0) if mask is not None else 0,
        c.stride(0), c.stride(1), bias.stride(0) if bias is not None else 0,
        x.stride(0) if fuse_da else 0, x.stride(1) if fuse_da else 0,
        USE_TMA=use_tma, B_KMAJOR=b_kmajor, HAS_BASE=has_base, HAS_MASK=mask is not None,
        HAS_BIAS=bias is not None, FUSE_DA=fuse_da, BLOCK_R=16,
        **_plan(("NP", "NQ", "ORDER", "LT"), plan), **_plan(("NX", "NS", "ORDER_DA"), da_plan),
    )


CAPABILITIES = Capabilities(devices=("cuda", "cpu"), max_rank=MAX_RANK, dtypes=SUPPORTED_DTYPES)


def not_supported_reasons(x, weight, bias, lora_A, lora_B, dropout_p, training) -> list[str]:
    """Why the Triton kernels cannot serve these inputs (empty list: they can)."""
    reasons = CAPABILITIES.reasons({"x": x, "lora_A": lora_A, "lora_B": lora_B},
                                   rank=lora_A.shape[0])
    if lora_A.dtype != lora_B.dtype:
        reasons.append("lora_A and lora_B in different dtypes")
    return reasons
