"""The Triton backend of prefix_attention (the backend contract of the package: `forward`,
`backward`, `not_supported_reasons`), after FlashAttention-2 and Triton's fused-attention
tutorial (own code). This module plans and launches; the kernels live in

- attention_forward.py: forward for Lq > 16 (prefix tile of its own width, unmasked tiles
  below the causal band, masked ones on it);
- attention_decode.py: forward for Lq <= 16 (query heads of a kv head packed in one tile,
  split-K over the keys with a deterministic LSE merge);
- attention_backward.py: delta, then dK/dV with the prefix gradient in the same launch
  (5-matmul backward, dS stored for dQ); attention_dq.py: dQ. The dS workspace is bounded
  (DS_WORKSPACE_BYTES): both run over slices of the (batch row, kv head) groups and, when a
  group's dS exceeds it, of the query rows (`plan_ds`); memory stays linear in the length.

Layout: q (B, Hq, Lq, D); k, v (B, Hkv, Lk, D); prefix_k/v (Bp, Hkv, P, D) with Bp in {1, B}
(a shared prefix is read with batch stride 0, never expanded); key_padding_mask (B, Lk) bool.
Query head h reads kv head h // (Hq // Hkv). Any strides. Causal is bottom-right: query i sees
key j iff j <= i + Lk - Lq; every query sees the prefix. Dots accumulate in fp32. Every launch
is on the inputs' device, with a 1-D grid, and no kernel uses atomics: results are
deterministic.

fp16 and bf16 only (CAPABILITIES): fp32 inputs would need IEEE fp32 dots (tf32 misses the
tolerance rule), which run on CUDA cores and spill; the torch backend (SDPA on CUDA) serves fp32
attention. Triton's interpreter alone also takes fp32 (it computes every dot in fp32 anyway;
the CPU tests check the kernels' logic exactly with it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import triton

from ..backends import Capabilities
from . import attention_common as common
from ._common import INTERPRETER
from .attention_backward import DELTA_ROWS, _bwd_kv_kernel, _delta_kernel
from .attention_decode import forward_decode
from .attention_dq import _dq_kernel, _dq_recompute_kernel, dq_grid
from .attention_forward import forward_prefill

DECODE_MAX_LQ = 16  # forward of at most this many queries takes the decode kernel
# The dS workspace of the backward (bytes): one buffer, reused by every slice (plan_ds). At
# the benchmark shape (B8 Hq32 Hkv8 L1024 P32 D128 bf16, 553 MB of dS) three launches of up
# to 22 groups (176+ key-tile programs each); at L = 8192 five slices of 1664 query rows, of
# 11 groups per launch for the first down to 2 for the last (causal: later rows see more keys).
DS_WORKSPACE_BYTES = 256 << 20
# Fewest query rows x query heads of a group per row slice: a slice re-reads and re-writes
# the fp32 dK, dV partials (16 D bytes per key) and that costs, per dS element, about
# 400 D / (rows x G) FLOP-equivalents at the H200's balance: past this point, recomputing
# S and dP in the dQ pass (4 D FLOPs per element) is cheaper (benchmarks/README.md).
DS_MIN_SLICE_ROWS = 1024


CAPABILITIES = Capabilities(devices=("cuda", "cpu"), dtypes=(torch.float16, torch.bfloat16),
                            max_head_dim=256, dropout=False)


def _check_dtype(q: torch.Tensor) -> None:
    """fp32 on a GPU is the torch backend's (CAPABILITIES): say so before any kernel runs."""
    if q.dtype == torch.float32 and q.device.type == "cuda":
        raise ValueError("the Triton prefix-attention kernels take fp16 or bf16 inputs on a GPU, "
                         "got float32; the torch backend (SDPA) serves fp32 attention")


def not_supported_reasons(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, dropout_p,
                          training) -> list[str]:
    """Why these kernels cannot serve the inputs (empty: they can); fp32 only in Triton's
    interpreter."""
    caps = CAPABILITIES
    if INTERPRETER:  # it computes every dot in fp32 anyway
        caps = replace(caps, dtypes=caps.dtypes + (torch.float32,))
    return caps.reasons({"q": q}, head_dim=q.shape[-1], dropout=dropout_p > 0 and training)


def forward(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale):
    """q (B, Hq, Lq, D); k, v (B, Hkv, Lk, D); prefix_k/v (Bp, Hkv, P, D) or None;
    key_padding_mask (B, Lk) bool or None -> (out (B, Hq, Lq, D) q.dtype, lse (B, Hq, Lq) fp32;
    a row that sees no key gets 0 and -inf)."""
    _check_dtype(q)
    B, Hq, Lq, D = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(-math.inf)
    prefix = common.Prefix(prefix_k, prefix_v, q)
    padding = common.Padding(key_padding_mask, q)
    run = forward_decode if Lq <= DECODE_MAX_LQ else forward_prefill
    with common.device_guard(q):
        run(q, k, v, prefix, padding, causal, scale, out, lse)
    return out, lse


@dataclass(frozen=True)
class DsSlice:
    """Query rows [row0, row1) of ``groups`` (batch row, kv head) groups per launch; their
    rows see the first ``keys`` sequence keys; a dS row holds ``width`` elements (the prefix's
    columns, then those keys')."""

    row0: int
    row1: int
    keys: int
    width: int
    groups: int


@dataclass(frozen=True)
class DsPlan:
    """The slices of the backward, row slice by row slice (each over all the groups), and the
    column of the first sequence key in a dS row (16-aligned, as every row length)."""

    seq_col: int
    slices: tuple[DsSlice, ...]
    head_row_bytes: int  # bytes per dS element, times G

    @property
    def nbytes(self) -> int:
        """The workspace: the largest slice."""
        return max(s.groups * (s.row1 - s.row0) * s.width * self.head_row_bytes
                   for s in self.slices)

    @property
    def rows_sliced(self) -> bool:
        return len(self.slices) > 1


def ds_row_align() -> int:
    """A slice of query rows starts at a multiple of every query tile of the dK/dV and dQ
    configs (all powers of two)."""
    return max(common.max_tile("bwd_kv", "BLOCK_M"), common.max_tile("bwd_kv", "BLOCK_MP"),
               common.max_tile("bwd_dq", "BLOCK_M"))


def plan_ds(B: int, Hkv: int, G: int, Lq: int, Lk: int, P: int, causal: bool,
            dtype: torch.dtype, sms: int = 132, budget: int | None = None) -> DsPlan | None:
    """The slices of the dS workspace (at most ``budget`` bytes, DS_WORKSPACE_BYTES by
    default), or None (dQ recomputes S and dP) when neither one whole group nor a slice of
    DS_MIN_SLICE_ROWS / G rows of one fits (about 130 k keys at 256 MiB, bf16).

    Whole groups while enough of them fit for their key tiles to fill the ``sms`` SMs. Else
    slices of query rows, as many as fill the SMs within the budget, whose dK, dV carry over
    in fp32; a causal slice's dS holds only the keys its rows see, so the first slices take
    more groups per launch. Group counts and row counts are balanced."""
    budget = DS_WORKSPACE_BYTES if budget is None else budget
    budget = min(budget, 2**31 - 1)  # the kernels address the workspace with int32 offsets
    head_bytes = G * dtype.itemsize
    seq_col = triton.cdiv(P, 16) * 16
    block_n = common.max_tile("bwd_kv", "BLOCK_N")
    groups = B * Hkv

    def piece(row0, row1):
        keys = min(Lk, max(0, row1 + Lk - Lq)) if causal else Lk
        width = seq_col + triton.cdiv(keys, 16) * 16
        n = min(groups, budget // max(1, (row1 - row0) * width * head_bytes))
        return DsSlice(row0, row1, keys, width, triton.cdiv(groups, triton.cdiv(groups, n))
                       if n else 0)

    whole = piece(0, Lq)
    if whole.groups == groups or whole.groups * triton.cdiv(Lk, block_n) >= sms:
        return DsPlan(seq_col, (whole,), head_bytes)
    align = ds_row_align()
    rows = min(budget // (sms * block_n * head_bytes),  # their key tiles fill the SMs
               budget // (whole.width * head_bytes))  # one group's last slice fits
    rows = rows // align * align
    if rows * G < DS_MIN_SLICE_ROWS or rows == 0:
        return DsPlan(seq_col, (whole,), head_bytes) if whole.groups else None
    rows = triton.cdiv(triton.cdiv(Lq, triton.cdiv(Lq, rows)), align) * align  # balanced
    return DsPlan(seq_col, tuple(piece(r, min(Lq, r + rows)) for r in range(0, Lq, rows)),
                  head_bytes)


def backward(dout, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, causal, scale):
    """Gradients (dq, dk, dv, dprefix_k, dprefix_v) in the inputs' shapes and dtypes
    (dprefix (Bp, Hkv, P, D), None when there is no prefix)."""
    _check_dtype(q)
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    if q.numel() == 0:  # no query: nothing flows back, and no kernel runs to say so
        zeros = [None if t is None else torch.zeros(t.shape, dtype=t.dtype, device=t.device)
                 for t in (q, k, v, prefix_k, prefix_v)]
        return tuple(zeros)
    prefix = common.Prefix(prefix_k, prefix_v, q)
    padding = common.Padding(key_padding_mask, q)
    P = prefix.P
    plan = plan_ds(B, Hkv, G, Lq, Lk, P, causal, q.dtype, common.sm_count(q.device))
    rows_sliced = plan is not None and plan.rows_sliced
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=q.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=q.device)
    dpk = dpv = None
    if prefix_k is not None:
        dpk = torch.empty(prefix_k.shape, dtype=prefix_k.dtype, device=q.device)
        dpv = torch.empty(prefix_v.shape, dtype=prefix_v.dtype, device=q.device)
    # fp32 prefix partials, reduced below in a fixed order: one per batch row for a prefix
    # shared by B > 1 rows; and whenever query rows are sliced (carried from slice to slice)
    partial = prefix.present and ((prefix.shared and B > 1) or rows_sliced)
    if partial:
        dpk_x = torch.empty((B, Hkv, P, D), dtype=torch.float32, device=q.device)
        dpv_x = torch.empty_like(dpk_x)
    elif prefix.present:
        dpk_x, dpv_x = dpk, dpv
    else:
        dpk_x = dpv_x = dq  # not written: no prefix programs
    # fp32 dK, dV of the row slices so far, when rows are sliced (every slice adds to them;
    # scaled and cast to dk, dv at the end)
    dk_acc = dv_acc = dk
    if rows_sliced:
        dk_acc = torch.empty((B * Hkv, Lk, D), dtype=torch.float32, device=q.device)
        dv_acc = torch.empty_like(dk_acc)
    lse = lse.to(torch.float32).contiguous()
    delta = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
    if plan is None:  # dQ recomputes S and dP: one launch, nothing stored
        ds, seq_col, slices = dq, 0, (DsSlice(0, Lq, Lk, 0, B * Hkv),)
    else:
        ds = torch.empty(plan.nbytes // q.element_size(), dtype=q.dtype, device=q.device)
        seq_col, slices = plan.seq_col, plan.slices
    block_d = common.block_d(D)
    keys = (common.bucket(Lq), common.bucket(Lk), common.bucket(P))
    flags = dict(DOT_FP32=common.dot_fp32(q.dtype), HEAD_DIM=D, BLOCK_D=block_d)
    n_p = triton.cdiv(P, prefix.block)
    block_dh = min(block_d, common.MAX_GRAD_TILE_D)  # dK, dV by parts of the head dim
    parts = block_d // block_dh
    with common.device_guard(q):
        common.launch(
            _delta_kernel, (B * Hq * triton.cdiv(Lq, DELTA_ROWS),),
            out, dout, delta, Hq, Lq, *out.stride(), *dout.stride(),
            HEAD_DIM=D, BLOCK_M=DELTA_ROWS, BLOCK_D=block_d,
        )
        for sl in slices:
            for group0 in range(0, B * Hkv, sl.groups):
                n = min(sl.groups, B * Hkv - group0)
                grid = lambda meta, n=n, sl=sl: (
                    n * (n_p + triton.cdiv(sl.keys, meta["BLOCK_N"])) * parts,)
                if n_p or sl.keys:  # else these rows see no key: their dS is not read
                    common.launch(
                        _bwd_kv_kernel, grid,
                        q, k, v, prefix.k, prefix.v, dout, lse, delta, padding.mask, dk, dv,
                        dpk_x, dpv_x, dk_acc, dv_acc, ds,
                        group0, n, sl.row0, sl.row1, sl.keys, Hq, Hkv, G, Lq, Lk, P,
                        float(scale), seq_col, sl.width, (sl.row1 - sl.row0) * sl.width, D,
                        *q.stride(), *k.stride(), *v.stride(), *prefix.k_strides,
                        *prefix.v_strides, *dout.stride(), *padding.strides, *dk.stride(),
                        *dv.stride(), *dpk_x.stride(), *dpv_x.stride(), *keys,
                        CAUSAL=bool(causal), HAS_PAD=padding.present,
                        STORE_DS=plan is not None, ACC_IN=sl.row0 > 0, ACC_OUT=rows_sliced,
                        BLOCK_P=prefix.block, BLOCK_DH=block_dh, **flags,
                    )
                if plan is not None:
                    common.launch(
                        _dq_kernel, dq_grid(n * G, sl.row1 - sl.row0),
                        ds, k, prefix.k, dq, group0 * G, sl.row0, sl.row1, Hq, G, Lq, Lk, P,
                        float(scale), seq_col, sl.width, (sl.row1 - sl.row0) * sl.width,
                        *k.stride(), *prefix.k_strides, *dq.stride(), *keys,
                        CAUSAL=bool(causal), BLOCK_P=prefix.block, **flags,
                    )
        if plan is None:
            common.launch(
                _dq_recompute_kernel, dq_grid(B * Hq, Lq),
                q, k, v, prefix.k, prefix.v, padding.mask, dout, lse, delta, dq,
                Hq, G, Lq, Lk, P, float(scale),
                *q.stride(), *k.stride(), *v.stride(), *prefix.k_strides, *prefix.v_strides,
                *padding.strides, *dout.stride(), *dq.stride(), *keys,
                CAUSAL=bool(causal), HAS_PAD=padding.present, BLOCK_P=prefix.block, **flags,
            )
    if rows_sliced:  # the last row slice left unscaled fp32 sums too (a store of bf16 spilled)
        dk.copy_(dk_acc.mul_(scale).view(k.shape))
        dv.copy_(dv_acc.view(v.shape))
    if partial:
        reduce = (lambda x: x.sum(0, keepdim=True)) if prefix.shared else (lambda x: x)
        dpk.copy_(reduce(dpk_x) * (scale if rows_sliced else 1.0))
        dpv.copy_(reduce(dpv_x))
    return dq, dk, dv, dpk, dpv
