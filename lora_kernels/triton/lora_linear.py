"""lora_linear in Triton: ``y = x W^T + b + scaling * dropout(x) A^T B^T``.

Kernels (after LoRAFusion and Punica's shrink/expand, see DESIGN.md):

forward
  ``_shrink``   S = dropout(x) A^T  (T, r) fp32; the Philox mask ``tl.rand(seed, row*in+col)``
                is drawn in the kernel and never stored.
  ``_fwd_gemm`` Y = x W^T with its fp32 accumulator seeded by ``scaling * S B^T`` and the bias
                added in the epilogue: the LoRA output never exists on its own in memory.
backward
  ``_ds_db``    one pass over dY: dS = scaling dY B (T, r) and dB = scaling dY^T S (out, r)
                (dB summed over row blocks with fp32 atomics).
  ``_dx``       dX = dY W + mask * (dS A) / (1-p), one GEMM whose accumulator starts at the
                masked LoRA term.
  ``_da``       dA = dS^T dropout(x), the mask regenerated from the seed.
  dW = dY^T x and db = sum(dY) (only when asked for) are plain cuBLAS calls through torch.

Dots: operands cast to the compute type of their side (x's dtype for the base GEMM, the adapter
dtype for the LoRA factors, as PEFT computes them), fp32 accumulation, fp32 dots in
``ieee`` precision. Under Triton's interpreter bf16 tiles are cast to fp32 before ``tl.dot``
(``INTERPRETER``), on a GPU bf16 dots stay on the tensor cores. Row and column indices are
int64, so ``row * stride`` cannot overflow; every load is masked.

Backend contract: ``forward``, ``backward``, ``not_supported_reasons`` (see the op).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ..backends import Capabilities
from ._common import INTERPRETER

MAX_RANK = 256
CAPABILITIES = Capabilities(devices=("cuda", "cpu"), max_rank=MAX_RANK,
                            dtypes=(torch.float32, torch.float16, torch.bfloat16))
_INTERP = tl.constexpr(INTERPRETER)
_TORCH_TO_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _configs(kernel: str) -> list[triton.Config]:
    """Autotune configurations of every kernel of this file (one small one in the interpreter,
    where each program is a Python loop iteration and autotuning would only cost time)."""
    if INTERPRETER:
        one = {
            "shrink": {"BLOCK_M": 32, "BLOCK_K": 32},
            "fwd": {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4},
            "ds_db": {"BLOCK_M": 32, "BLOCK_N": 32},
            "dx": {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4},
            "da": {"BLOCK_M": 32, "BLOCK_N": 32},
        }[kernel]
        return [triton.Config(one, num_warps=4, num_stages=1)]
    if kernel == "shrink":
        return [
            triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=st)
            for bm, bk, w, st in [(64, 64, 4, 3), (128, 64, 4, 3), (64, 128, 4, 3), (32, 128, 4, 4),
                                  (128, 32, 8, 3), (32, 32, 4, 2)]
        ]
    if kernel in ("fwd", "dx"):
        return [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                          num_warps=w, num_stages=st)
            for bm, bn, bk, w, st in [
                (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
                (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 4),
                (128, 128, 32, 4, 4), (64, 256, 32, 8, 4),
            ]
        ]
    if kernel == "ds_db":
        return [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
            for bm, bn, w, st in [(64, 64, 4, 3), (128, 64, 8, 3), (32, 128, 4, 3), (64, 128, 4, 3),
                                  (32, 64, 4, 4), (32, 32, 4, 2), (16, 32, 4, 2)]
        ]
    if kernel == "da":
        return [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
            for bm, bn, w, st in [(64, 64, 4, 3), (128, 64, 4, 3), (64, 128, 8, 3), (32, 64, 4, 4),
                                  (128, 32, 4, 3), (32, 32, 4, 2)]
        ]
    raise KeyError(kernel)


@triton.jit
def _mma(a, b, acc, CT: tl.constexpr):
    """acc + a @ b with both operands cast to the compute type CT (0: float32, dotted in ieee
    precision; 1: float16; 2: bfloat16)."""
    if CT == 0:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif CT == 1:
        return tl.dot(a.to(tl.float16), b.to(tl.float16), acc)
    else:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)


@triton.jit
def _to_out(acc, OUT_TY: tl.constexpr):
    """Round the fp32 accumulator to the output type, to nearest even. (The interpreter's
    float32 -> bfloat16 cast truncates; there the rounding bias is added to the bits first.)"""
    if OUT_TY == tl.float32:
        return acc
    else:
        if _INTERP:
            if OUT_TY == tl.bfloat16:
                bits = acc.to(tl.uint32, bitcast=True)
                bits = bits + 0x7FFF + ((bits >> 16) & 1)
                acc = bits.to(tl.float32, bitcast=True)
        return acc.to(OUT_TY)


@triton.jit
def _keep(seed, p, rows, cols, IN):
    """Philox keep-mask of x elements (rows (M, 1), cols (1, N), int64): u >= p."""
    return tl.rand(seed, rows * IN + cols) >= p


@triton.jit
def _grouped_pid(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (row block, column block), rows grouped for L2 reuse."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.autotune(configs=_configs("shrink"), key=["T_KEY", "IN", "R"])
@triton.jit
def _shrink(
    x_ptr, a_ptr, s_ptr,
    seed, p, inv_keep,
    T, IN, R, T_KEY,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_sm, stride_sr,
    HAS_DROPOUT: tl.constexpr, CT: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """S[m, :] = dropout(x[m, :]) A^T for a block of rows; all r columns in one tile."""
    rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rr = tl.arange(0, BLOCK_R).to(tl.int64)
    rk = tl.arange(0, BLOCK_K).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, IN, BLOCK_K):
        kk = k0 + rk
        x_mask = (rm[:, None] < T) & (kk[None, :] < IN)
        xt = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :] * stride_xk, mask=x_mask, other=0.0)
        if HAS_DROPOUT:
            xt = tl.where(_keep(seed, p, rm[:, None], kk[None, :], IN), xt, 0.0)
        at = tl.load(a_ptr + rr[None, :] * stride_ar + kk[:, None] * stride_ak,
                     mask=(rr[None, :] < R) & (kk[:, None] < IN), other=0.0)
        acc = _mma(xt, at, acc, CT)
    if HAS_DROPOUT:
        acc = acc * inv_keep
    tl.store(s_ptr + rm[:, None] * stride_sm + rr[None, :] * stride_sr, acc,
             mask=(rm[:, None] < T) & (rr[None, :] < R))


@triton.autotune(configs=_configs("fwd"), key=["T_KEY", "IN", "OUT", "R"])
@triton.jit
def _fwd_gemm(
    x_ptr, w_ptr, bias_ptr, s_ptr, b_ptr, y_ptr,
    scaling,
    T, IN, OUT, R, T_KEY,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sm, stride_sr,
    stride_bn, stride_br, stride_ym, stride_yn, stride_bias,
    HAS_BIAS: tl.constexpr, CT_BASE: tl.constexpr, CT_LORA: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Y = scaling * S B^T + x W^T + bias: the LoRA term seeds the fp32 accumulator."""
    pid_m, pid_n = _grouped_pid(T, OUT, BLOCK_M, BLOCK_N, GROUP_M)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K).to(tl.int64)
    rr = tl.arange(0, BLOCK_R).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        kr = r0 + rr
        st = tl.load(s_ptr + rm[:, None] * stride_sm + kr[None, :] * stride_sr,
                     mask=(rm[:, None] < T) & (kr[None, :] < R), other=0.0)
        bt = tl.load(b_ptr + rn[None, :] * stride_bn + kr[:, None] * stride_br,
                     mask=(rn[None, :] < OUT) & (kr[:, None] < R), other=0.0)
        acc = _mma(st, bt, acc, CT_LORA)
    acc = acc * scaling
    for k0 in range(0, IN, BLOCK_K):
        kk = k0 + rk
        xt = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :] * stride_xk,
                     mask=(rm[:, None] < T) & (kk[None, :] < IN), other=0.0)
        wt = tl.load(w_ptr + rn[None, :] * stride_wn + kk[:, None] * stride_wk,
                     mask=(rn[None, :] < OUT) & (kk[:, None] < IN), other=0.0)
        acc = _mma(xt, wt, acc, CT_BASE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn * stride_bias, mask=rn < OUT, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn,
             _to_out(acc, y_ptr.dtype.element_ty), mask=(rm[:, None] < T) & (rn[None, :] < OUT))


@triton.autotune(configs=_configs("ds_db"), key=["T_KEY", "OUT", "R"], reset_to_zero=["db_ptr"])
@triton.jit
def _ds_db(
    dy_ptr, b_ptr, s_ptr, ds_ptr, db_ptr,
    scaling,
    T, OUT, R, T_KEY,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_sm, stride_sr,
    stride_dsm, stride_dsr, stride_dbn, stride_dbr,
    NEED_DS: tl.constexpr, NEED_DB: tl.constexpr, CT: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One pass over a row block of dY: dS = scaling dY B (complete here) and this block's
    share of dB = scaling dY^T S (added into the fp32 dB with atomics)."""
    rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = tl.arange(0, BLOCK_N).to(tl.int64)
    rr = tl.arange(0, BLOCK_R).to(tl.int64)
    ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if NEED_DB:
        st = tl.load(s_ptr + rm[:, None] * stride_sm + rr[None, :] * stride_sr,
                     mask=(rm[:, None] < T) & (rr[None, :] < R), other=0.0)
    for n0 in range(0, OUT, BLOCK_N):
        nn = n0 + rn
        dyt = tl.load(dy_ptr + rm[:, None] * stride_dym + nn[None, :] * stride_dyn,
                      mask=(rm[:, None] < T) & (nn[None, :] < OUT), other=0.0)
        if NEED_DS:
            bt = tl.load(b_ptr + nn[:, None] * stride_bn + rr[None, :] * stride_br,
                         mask=(nn[:, None] < OUT) & (rr[None, :] < R), other=0.0)
            ds = _mma(dyt, bt, ds, CT)
        if NEED_DB:
            part = _mma(tl.trans(dyt), st, tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32), CT)
            tl.atomic_add(db_ptr + nn[:, None] * stride_dbn + rr[None, :] * stride_dbr,
                          part * scaling, mask=(nn[:, None] < OUT) & (rr[None, :] < R))
    if NEED_DS:
        tl.store(ds_ptr + rm[:, None] * stride_dsm + rr[None, :] * stride_dsr, ds * scaling,
                 mask=(rm[:, None] < T) & (rr[None, :] < R))


@triton.autotune(configs=_configs("dx"), key=["T_KEY", "IN", "OUT", "R"])
@triton.jit
def _dx(
    dy_ptr, w_ptr, ds_ptr, a_ptr, dx_ptr,
    seed, p, inv_keep,
    T, IN, OUT, R, T_KEY,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_dsm, stride_dsr,
    stride_ar, stride_ak, stride_dxm, stride_dxk,
    HAS_DROPOUT: tl.constexpr, CT_BASE: tl.constexpr, CT_LORA: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dX = dY W + mask * (dS A) / (1-p): the masked LoRA term seeds the accumulator."""
    pid_m, pid_n = _grouped_pid(T, IN, BLOCK_M, BLOCK_N, GROUP_M)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # columns of x (in)
    rk = tl.arange(0, BLOCK_K).to(tl.int64)  # reduction over out
    rr = tl.arange(0, BLOCK_R).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        kr = r0 + rr
        dst = tl.load(ds_ptr + rm[:, None] * stride_dsm + kr[None, :] * stride_dsr,
                      mask=(rm[:, None] < T) & (kr[None, :] < R), other=0.0)
        at = tl.load(a_ptr + kr[:, None] * stride_ar + rn[None, :] * stride_ak,
                     mask=(kr[:, None] < R) & (rn[None, :] < IN), other=0.0)
        acc = _mma(dst, at, acc, CT_LORA)
    if HAS_DROPOUT:
        acc = tl.where(_keep(seed, p, rm[:, None], rn[None, :], IN), acc * inv_keep, 0.0)
    for k0 in range(0, OUT, BLOCK_K):
        kk = k0 + rk
        dyt = tl.load(dy_ptr + rm[:, None] * stride_dym + kk[None, :] * stride_dyn,
                      mask=(rm[:, None] < T) & (kk[None, :] < OUT), other=0.0)
        wt = tl.load(w_ptr + kk[:, None] * stride_wn + rn[None, :] * stride_wk,
                     mask=(kk[:, None] < OUT) & (rn[None, :] < IN), other=0.0)
        acc = _mma(dyt, wt, acc, CT_BASE)
    tl.store(dx_ptr + rm[:, None] * stride_dxm + rn[None, :] * stride_dxk,
             _to_out(acc, dx_ptr.dtype.element_ty), mask=(rm[:, None] < T) & (rn[None, :] < IN))


@triton.autotune(configs=_configs("da"), key=["T_KEY", "IN", "R"])
@triton.jit
def _da(
    ds_ptr, x_ptr, da_ptr,
    seed, p, inv_keep,
    T, IN, R, T_KEY,
    stride_dsm, stride_dsr, stride_xm, stride_xk, stride_dar, stride_dak,
    HAS_DROPOUT: tl.constexpr, CT: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dA[:, cols] = dS^T dropout(x[:, cols]), looping over all rows."""
    rn = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rm = tl.arange(0, BLOCK_M).to(tl.int64)
    rr = tl.arange(0, BLOCK_R).to(tl.int64)
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for m0 in range(0, T, BLOCK_M):
        mm = m0 + rm
        dst = tl.load(ds_ptr + rr[:, None] * stride_dsr + mm[None, :] * stride_dsm,
                      mask=(rr[:, None] < R) & (mm[None, :] < T), other=0.0)
        xt = tl.load(x_ptr + mm[:, None] * stride_xm + rn[None, :] * stride_xk,
                     mask=(mm[:, None] < T) & (rn[None, :] < IN), other=0.0)
        if HAS_DROPOUT:
            xt = tl.where(_keep(seed, p, mm[:, None], rn[None, :], IN), xt, 0.0)
        acc = _mma(dst, xt, acc, CT)
    if HAS_DROPOUT:
        acc = acc * inv_keep
    tl.store(da_ptr + rr[:, None] * stride_dar + rn[None, :] * stride_dak,
             _to_out(acc, da_ptr.dtype.element_ty), mask=(rr[:, None] < R) & (rn[None, :] < IN))


# ----------------------------------------------------------------------------- launchers


def _ct(dtype: torch.dtype) -> int:
    """Compute-type code (see ``_mma``) of a dot whose operands are in ``dtype``."""
    if INTERPRETER and dtype == torch.bfloat16:
        return 0  # the interpreter's bf16 dot is wrong (see _common.py): dot in float32
    return {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[dtype]


def _t_key(T: int) -> int:
    """Autotuning key of the row count: its power-of-two bucket (up to 16384), so that varying
    batch and sequence lengths do not re-tune the kernels at every new length."""
    return min(triton.next_power_of_2(max(T, 1)), 16384)


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _dropout_args(dropout_p: float, seed: int):
    p = float(dropout_p)
    return int(seed) & 0x7FFFFFFFFFFFFFFF, p, (1.0 / (1.0 - p)) if p > 0 else 1.0


def _on_device(t: torch.Tensor):
    """Launch on ``t``'s GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    """x (T, in); weight (out, in); bias (out,) or None; lora_A (r, in); lora_B (out, r)
    -> (y (T, out) in x's dtype, s (T, r) float32). See the module docstring."""
    with _on_device(x):
        return _forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)


def _forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    T, IN = x.shape
    OUT, R = weight.shape[0], lora_A.shape[0]
    s = torch.empty(T, R, device=x.device, dtype=torch.float32)
    y = torch.empty(T, OUT, device=x.device, dtype=x.dtype)
    if T == 0:
        return y, s
    seed, p, inv_keep = _dropout_args(dropout_p, seed)
    block_r = _block_r(R)
    _shrink[lambda m: (triton.cdiv(T, m["BLOCK_M"]),)](
        x, lora_A, s, seed, p, inv_keep, T, IN, R, _t_key(T),
        x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), s.stride(0), s.stride(1),
        HAS_DROPOUT=p > 0, CT=_ct(lora_A.dtype), BLOCK_R=block_r,
    )
    if OUT == 0:
        return y, s
    _fwd_gemm[lambda m: (triton.cdiv(T, m["BLOCK_M"]) * triton.cdiv(OUT, m["BLOCK_N"]),)](
        x, weight, bias if bias is not None else y, s, lora_B, y, float(scaling), T, IN, OUT, R, _t_key(T),
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), s.stride(0), s.stride(1),
        lora_B.stride(0), lora_B.stride(1), y.stride(0), y.stride(1),
        bias.stride(0) if bias is not None else 0,
        HAS_BIAS=bias is not None, CT_BASE=_ct(x.dtype), CT_LORA=_ct(lora_B.dtype),
        BLOCK_R=min(block_r, 64),
    )
    return y, s


def backward(dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed, needs):
    """Gradients ``(dx, dweight, dbias, dA, dB)`` for ``needs`` (x, weight, bias, lora_A,
    lora_B), None where not needed; dweight (out, in) in the layout ``weight`` was passed."""
    with _on_device(x):
        return _backward(dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed, needs)


def _backward(dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed, needs):
    need_x, need_w, need_b, need_a, need_bb = (bool(n) for n in needs)
    T, IN = x.shape
    OUT, R = weight.shape[0], lora_A.shape[0]
    dev, adt = x.device, lora_A.dtype
    seed, p, inv_keep = _dropout_args(dropout_p, seed)
    block_r = _block_r(R)
    ct_lora = _ct(adt)
    need_ds = need_x or need_a
    ds = torch.empty(T, R, device=dev, dtype=torch.float32) if need_ds else s
    db32 = torch.zeros(OUT, R, device=dev, dtype=torch.float32) if need_bb else None
    if (need_ds or need_bb) and T > 0 and OUT > 0:
        _ds_db[lambda m: (triton.cdiv(T, m["BLOCK_M"]),)](
            dy, lora_B, s, ds, db32 if db32 is not None else ds, float(scaling), T, OUT, R, _t_key(T),
            dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1), s.stride(0), s.stride(1),
            ds.stride(0), ds.stride(1),
            db32.stride(0) if db32 is not None else 0, db32.stride(1) if db32 is not None else 0,
            NEED_DS=need_ds, NEED_DB=need_bb, CT=ct_lora, BLOCK_R=block_r,
        )
    elif need_ds:
        ds.zero_()
    dx = dA = None
    if need_x:
        dx = torch.empty(T, IN, device=dev, dtype=x.dtype)
        if T > 0 and IN > 0:
            _dx[lambda m: (triton.cdiv(T, m["BLOCK_M"]) * triton.cdiv(IN, m["BLOCK_N"]),)](
                dy, weight, ds, lora_A, dx, seed, p, inv_keep, T, IN, OUT, R, _t_key(T),
                dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1),
                ds.stride(0), ds.stride(1), lora_A.stride(0), lora_A.stride(1),
                dx.stride(0), dx.stride(1),
                HAS_DROPOUT=p > 0, CT_BASE=_ct(x.dtype), CT_LORA=ct_lora, BLOCK_R=min(block_r, 64),
            )
    if need_a:
        dA = torch.empty(R, IN, device=dev, dtype=adt)
        if IN > 0:
            _da[lambda m: (triton.cdiv(IN, m["BLOCK_N"]),)](
                ds, x, dA, seed, p, inv_keep, T, IN, R, _t_key(T),
                ds.stride(0), ds.stride(1), x.stride(0), x.stride(1), dA.stride(0), dA.stride(1),
                HAS_DROPOUT=p > 0, CT=ct_lora, BLOCK_R=block_r,
            )
    dB = db32.to(lora_B.dtype) if need_bb else None
    dw = torch.mm(dy.t(), x) if need_w else None
    db = dy.sum(0) if need_b else None
    return dx, dw, db, dA, dB


def not_supported_reasons(x, weight, bias, lora_A, lora_B, dropout_p, training) -> list[str]:
    """Why the Triton kernels cannot serve these inputs (empty list: they can)."""
    reasons = CAPABILITIES.reasons({"x": x, "lora_A": lora_A, "lora_B": lora_B},
                                   rank=lora_A.shape[0])
    if lora_A.dtype != lora_B.dtype:
        reasons.append("lora_A and lora_B in different dtypes")
    return reasons
