"""The base GEMM of lora_linear with the LoRA term in its accumulator (forward and dX).

    C = bias + keep * factor * (P Q) + A B          (M, N), fp32 accumulation, stored in C's dtype

forward: A = x (T, in), B = W^T, P = S (T, r), Q = B^T (r, out), factor = scaling, no keep.
dX:      A = dY (T, out), B = W, P = dS (T, r), Q = A (r, in), factor = 1 / (1 - p), keep = the
         stored dropout bits; no bias. With ``FUSE_DA`` each tile also reads x's tile and
         writes its share of dA (partials per DA_BLOCK_M rows, summed by the launcher).

The LoRA term (a K = r dot in split precision, see :mod:`.lora_dots`) seeds the accumulator, so
it never exists in memory on its own. Without ``HAS_BASE`` the kernel writes bias + LoRA term
and cuBLAS adds A B onto it (fp32 bases).

Persistent: ``min(tiles, SMs)`` programs walk the tiles in grouped order. ``USE_TMA``: A and B
arrive as host-made tensor descriptors (``triton.tools.tensor_descriptor``, Triton >= 3.4), so
the mainloop's loads are TMA copies, zero-filled past the edges; without it (strides TMA cannot
take, or an fp32 prologue-only launch) they are masked pointer loads.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import _common
from ._common import INTERPRETER
from .lora_dots import base_dot, round_to, split_dot
from .lora_dropout import load_keep


def _set_tma_blocks(nargs):
    """Autotune pre-hook: the descriptors' block shapes are the config's tile."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    if isinstance(nargs["a"], TensorDescriptor):
        nargs["a"].block_shape = [bm, bk]
    if isinstance(nargs["b"], TensorDescriptor):
        nargs["b"].block_shape = [bn, bk] if nargs["B_KMAJOR"] else [bk, bn]


def _cfg(bm, bn, bk, group_m, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
                         num_warps=warps, num_stages=stages, pre_hook=_set_tma_blocks)


def launch_class(HAS_BASE, FUSE_DA, **_) -> str:
    """"gemm": with the base mainloop; "lora": bias + LoRA term only (cuBLAS does the rest);
    "_da": with dA fused (BLOCK_M fixed at :data:`DA_BLOCK_M`, the partials' row block)."""
    return ("gemm" if HAS_BASE else "lora") + ("_da" if FUSE_DA else "")


DA_BLOCK_M = 32 if INTERPRETER else 128
# Each config compiles for sm_90 without spills, with wgmma in every dot, for its class.
if INTERPRETER:
    CONFIGS = _common.ConfigTable(
        dict.fromkeys(("gemm", "lora", "gemm_da", "lora_da"), [_cfg(32, 32, 32, 2, 4, 1)]),
        launch_class)
else:
    _g = [_cfg(128, 256, 64, 8, 8, 3), _cfg(128, 128, 64, 8, 8, 4), _cfg(64, 128, 64, 8, 4, 4),
          _cfg(128, 64, 64, 8, 4, 4)]
    CONFIGS = _common.ConfigTable({"gemm": _g, "lora": _g[1:], "gemm_da": [_g[1], _g[3]],
                                   "lora_da": [_g[1], _g[3]]}, launch_class)


@triton.jit
def _tile_of(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Tile index -> (row block, column block), GROUP_M row blocks side by side for L2 reuse."""
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (tile // width) * GROUP_M
    size_m = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    return first_m + (tile % width) % size_m, (tile % width) // size_m


@triton.jit
def lora_gemm(
    a, b, p_ptr, q_ptr, mask_ptr, bias_ptr, c_ptr, x_ptr, da_ptr,
    factor,
    M, N, K, R, T_KEY,
    stride_am, stride_ak, stride_bk, stride_bn, stride_pm, stride_qr, stride_qn, stride_mm,
    stride_cm, stride_cn, stride_bias, stride_xm, stride_xk,
    USE_TMA: tl.constexpr, B_KMAJOR: tl.constexpr, HAS_BASE: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, FUSE_DA: tl.constexpr,
    NP: tl.constexpr, NQ: tl.constexpr, ORDER: tl.constexpr, LT: tl.constexpr,
    NX: tl.constexpr, NS: tl.constexpr, ORDER_DA: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """See the module docstring; ``a``/``b`` are pointers, or descriptors with ``USE_TMA``
    (``b`` over (N, K) when ``B_KMAJOR``, else over (K, N)). ``FUSE_DA`` (dX only): the tile
    also writes its share of dA = dS^T (keep * x) factor, da_ptr[row block, r, columns], from
    the dS tile its prologue loads and x's tile (an extra read inside a compute-bound kernel)."""
    rr = tl.arange(0, BLOCK_R).to(tl.int64)
    rk = tl.arange(0, BLOCK_K).to(tl.int64)
    n_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        pid_m, pid_n = _tile_of(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
        rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)[None, :]
        if FUSE_DA:  # first, so that x's tile is dead before the accumulator lives
            xt = tl.load(x_ptr + rm * stride_xm + rn * stride_xk, mask=(rm < M) & (rn < N),
                         other=0.0)
            if HAS_MASK:
                xt = tl.where(load_keep(mask_ptr, stride_mm, rm, pid_n * (BLOCK_N // 16), M, N,
                                        BLOCK_M, BLOCK_N), xt, 0.0)
            xt = tl.trans(xt)
            for r0 in range(0, R, BLOCK_R):
                kr = r0 + rr
                pt = tl.load(p_ptr + rm * stride_pm + kr[None, :],
                             mask=(rm < M) & (kr[None, :] < R), other=0.0)
                da = split_dot(xt, pt, tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32),
                               NX, NS, ORDER_DA, LT)
                tl.store(da_ptr + (pid_m.to(tl.int64) * R + kr[None, :]) * N + tl.trans(rn),
                         da * factor, mask=(kr[None, :] < R) & (tl.trans(rn) < N))
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            kr = r0 + rr
            pt = tl.load(p_ptr + rm * stride_pm + kr[None, :], mask=(rm < M) & (kr[None, :] < R),
                         other=0.0)
            qt = tl.load(q_ptr + kr[:, None] * stride_qr + rn * stride_qn,
                         mask=(kr[:, None] < R) & (rn < N), other=0.0)
            acc = split_dot(pt, qt, acc, NP, NQ, ORDER, LT)
        acc = acc * factor
        if HAS_MASK:  # (read again rather than held: registers)
            acc = tl.where(load_keep(mask_ptr, stride_mm, rm, pid_n * (BLOCK_N // 16), M, N,
                                     BLOCK_M, BLOCK_N), acc, 0.0)
        if HAS_BASE:
            for k0 in range(0, K, BLOCK_K):
                if USE_TMA:
                    at = a.load([pid_m * BLOCK_M, k0])
                    if B_KMAJOR:
                        bt = tl.trans(b.load([pid_n * BLOCK_N, k0]))
                    else:
                        bt = b.load([k0, pid_n * BLOCK_N])
                else:
                    kk = k0 + rk
                    at = tl.load(a + rm * stride_am + kk[None, :] * stride_ak,
                                 mask=(rm < M) & (kk[None, :] < K), other=0.0)
                    bt = tl.load(b + kk[:, None] * stride_bk + rn * stride_bn,
                                 mask=(kk[:, None] < K) & (rn < N), other=0.0)
                acc = base_dot(at, bt, acc)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn * stride_bias, mask=rn < N, other=0.0).to(tl.float32)
        tl.store(c_ptr + rm * stride_cm + rn * stride_cn, round_to(acc, c_ptr.dtype.element_ty),
                 mask=(rm < M) & (rn < N))


# One autotuner each (their best configs differ): the forward GEMM and the dX GEMM.
_KEY = ["T_KEY", "N", "K", "R", "HAS_BASE", "USE_TMA", "FUSE_DA"]
_PRUNE = {"early_config_prune": CONFIGS.prune}
fwd_gemm = triton.autotune(configs=CONFIGS.all(), key=_KEY, prune_configs_by=_PRUNE)(lora_gemm)
dx_gemm = triton.autotune(configs=CONFIGS.all(), key=_KEY, prune_configs_by=_PRUNE)(lora_gemm)


def tma_ok(t) -> bool:
    """Whether a 2-D tensor can back a TMA descriptor over its contiguous dimension: 16-byte
    aligned base and row stride, unit stride inside a row (either way round)."""
    if t.dim() != 2 or min(t.shape) == 0:
        return False
    inner = 1 if t.stride(1) == 1 else (0 if t.stride(0) == 1 else None)
    if inner is None:
        return False
    outer = t.stride(1 - inner) * t.element_size()
    return t.data_ptr() % 16 == 0 and outer % 16 == 0


def descriptor(t, transpose: bool) -> TensorDescriptor:
    """A descriptor over ``t`` (or over ``t.t()``, to have the unit stride last); block shape
    set per config by the autotune pre-hook."""
    v = t.t() if transpose else t
    return TensorDescriptor(v, list(v.shape), list(v.stride()), [16, 16])
