"""What the sm_90 profile compiles: launcher calls at the benchmark shapes (``PROFILE_CASES``).

Convention: one ``Case`` per launcher call sequence. ``run`` calls the package's own launchers
(``forward``/``backward`` of a Triton backend module) on ``meta`` tensors (shapes and dtypes, no
storage); ``capture.recording`` intercepts every kernel launch they make, so each kernel is
compiled with exactly the arguments, constexprs and autotune configs the launcher produces at
that shape. When a kernel or launcher changes, nothing here needs to change unless the launcher's
signature does; a new kernel needs a case only if no existing case launches it (the profile
fails, naming it, when a kernel of ``lora_kernels/triton/`` is launched by no gated case).

``gate=True`` cases are the ones ``tests/test_sm90_gate.py`` enforces: today every case (the
benchmark shapes, which together launch every kernel, and their variants); a case with
``gate=False`` would be profiled for the record only (off the CI budget). Meta tensors are on no GPU: the launchers that size grids by the SM count are told 132
(an H200) while a case runs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .capture import meta, tag

# Benchmark shapes (benchmarks/README.md): LoRA T=8192, in=out=4096, r=16, p=0.1, alpha=32;
# prefix attention B8 Hq32 Hkv8 L1024 P32 D128, causal, shared prefix.
LORA = dict(T=8192, IN=4096, OUT=4096, R=16, P=0.1, ALPHA=32.0)
ATTN = dict(B=8, HQ=32, HKV=8, L=1024, P=32, D=128)
H200_SMS = 132
SEED = 0x5DEECE66D1234567  # any 63-bit seed: the launcher passes it as two words
# lora_linear.backward's `needs`: (x, weight, bias, lora_A, lora_B)
TRAIN = (True, False, False, True, True)  # frozen W, no bias grad: dX, dA, dB
NO_DX = (False, False, False, True, True)  # x needs no grad (first layer): dA takes its own pass


@dataclass
class Case:
    name: str
    run: Callable[[], None]
    gate: bool
    doc: str


@contextlib.contextmanager
def _h200_sms():
    """lora_linear sizes persistent and split grids by ``num_sms(device)``, which is 4 off
    CUDA; tell it 132. (The attention launchers already plan for 132 SMs off CUDA.)"""
    from lora_kernels.triton import lora_linear
    saved = lora_linear.num_sms
    lora_linear.num_sms = lambda device: H200_SMS
    try:
        yield
    finally:
        lora_linear.num_sms = saved


def _lora(base=torch.bfloat16, adapters=torch.float32, R=LORA["R"], p=LORA["P"],
          backwards=(TRAIN,)):
    def run():
        from lora_kernels.triton import lora_linear as k
        T, IN, OUT = LORA["T"], LORA["IN"], LORA["OUT"]
        x, w = meta(T, IN, dtype=base), meta(OUT, IN, dtype=base)
        a, b = meta(R, IN, dtype=adapters), meta(OUT, R, dtype=adapters)
        scaling = LORA["ALPHA"] / R
        with _h200_sms():
            y, s = k.forward(x, w, None, a, b, scaling, p, SEED)
            for needs in backwards:
                k.backward(meta(T, OUT, dtype=base), x, w, a, b, s, scaling, p, SEED, needs)
    return run


def _attn_inputs(dtype, D, B=ATTN["B"], L=ATTN["L"], Lq=None, per_row_prefix=False):
    HQ, HKV, P = ATTN["HQ"], ATTN["HKV"], ATTN["P"]
    Lq = L if Lq is None else Lq
    q = meta(B, HQ, Lq, D, dtype=dtype)
    kk, v = meta(B, HKV, L, D, dtype=dtype), meta(B, HKV, L, D, dtype=dtype)
    bp = B if per_row_prefix else 1
    pk, pv = meta(bp, HKV, P, D, dtype=dtype), meta(bp, HKV, P, D, dtype=dtype)
    return q, kk, v, pk, pv


def _attention(dtype=torch.bfloat16, D=ATTN["D"], padding=False, per_row_prefix=False):
    def run():
        from lora_kernels.triton import prefix_attention as k
        q, kk, v, pk, pv = _attn_inputs(dtype, D, per_row_prefix=per_row_prefix)
        mask = meta(ATTN["B"], ATTN["L"], dtype=torch.bool) if padding else None
        scale = 1.0 / math.sqrt(D)
        out, lse = k.forward(q, kk, v, pk, pv, mask, True, scale)
        k.backward(torch.empty_like(q), q, kk, v, pk, pv, mask, out, lse, True, scale)
    return run


def _decode(lk=4096, lqs=(1, 16)):
    """Forward only, Lq queries over a cache of lk keys: 64 (batch, kv head) programs leave
    SMs idle, so the keys are split (split-K) and merged."""
    def run():
        from lora_kernels.triton import prefix_attention as k
        D = ATTN["D"]
        for lq in lqs:
            q, kk, v, pk, pv = _attn_inputs(torch.bfloat16, D, L=lk, Lq=lq)
            with tag(f"Lq={lq}"):
                k.forward(q, kk, v, pk, pv, None, True, 1.0 / math.sqrt(D))
    return run


def _attention_long(L=4096, B=1):
    """Backward only at L = 4096 (B = 1: the same specialisations as B = 8, fewer launches),
    twice: within the dS workspace (prefix_attention.plan_ds slices the query rows, dK/dV carried
    over in fp32 from slice to slice), and with no workspace (DS_WORKSPACE_BYTES = 0: dK/dV
    store no dS, dQ recomputes S and dP)."""
    def run():
        from lora_kernels.triton import prefix_attention as k
        D = ATTN["D"]
        q, kk, v, pk, pv = _attn_inputs(torch.bfloat16, D, B=B, L=L)
        HQ, HKV = ATTN["HQ"], ATTN["HKV"]
        plan = k.plan_ds(B, HKV, HQ // HKV, L, L, ATTN["P"], True, q.dtype)
        assert plan is not None and plan.rows_sliced
        out, lse = torch.empty_like(q), meta(B, HQ, L, dtype=torch.float32)
        saved = k.DS_WORKSPACE_BYTES
        for budget, name in ((saved, "row slices"), (0, "recompute")):
            k.DS_WORKSPACE_BYTES = budget
            try:
                with tag(name):
                    k.backward(torch.empty_like(q), q, kk, v, pk, pv, None, out, lse, True,
                               1.0 / math.sqrt(D))
            finally:
                k.DS_WORKSPACE_BYTES = saved
    return run


_LORA_SHAPE = "T=8192 in=out=4096 p=0.1"
PROFILE_CASES: list[Case] = [
    Case("lora", _lora(backwards=(TRAIN, NO_DX)), gate=True,
         doc="LoRA fwd+bwd, bf16 x/W, fp32 adapters (PEFT's default), frozen W (no dW), "
             f"{_LORA_SHAPE} r=16; the backward twice: with dX (dA fused into the dX GEMM) and "
             "with x needing no grad (dA in its own pass, `_da`)"),
    Case("attn", _attention(), gate=True,
         doc="prefix attention fwd+bwd, bf16, B8 Hq32 Hkv8 L1024 P32 D128, causal, shared prefix"),
    Case("attn-decode", _decode(), gate=True,
         doc="prefix attention decode forward, bf16, B8 Hq32 Hkv8 P32 D128, Lq=1 and Lq=16 over "
             "Lk=4096 cached keys, causal: split-K and the merge kernel"),
    Case("attn-long", _attention_long(), gate=True,
         doc="prefix attention backward, bf16, B1 Hq32 Hkv8 L4096 P32 D128, causal: dS in "
             "slices of query rows within DS_WORKSPACE_BYTES (dK/dV carried over in fp32), and "
             "with no workspace (dK/dV store no dS, dQ recomputes)"),
    Case("lora-fp16", _lora(base=torch.float16), gate=True,
         doc="as lora (backward with dX), fp16 x/W, fp32 adapters: x and dY split in pieces"),
    Case("lora-fp32", _lora(base=torch.float32, backwards=(TRAIN, NO_DX)), gate=True,
         doc="as lora, fp32 x/W, fp32 adapters: the GEMMs' LoRA prologue only (cuBLAS adds "
             "x W^T), dA in its own pass"),
    Case("lora-bf16A", _lora(adapters=torch.bfloat16), gate=True,
         doc="as lora (backward with dX), adapters in bf16 (PEFT with autocast_adapter_dtype=False)"),
    Case("lora-r64", _lora(R=64), gate=True,
         doc="as lora (backward with dX), r=64: 64-rank chunks, dA above the fused limit "
             "(r > 32) in its own pass"),
    Case("lora-p0", _lora(p=0.0, backwards=(TRAIN, NO_DX)), gate=True,
         doc="as lora, no dropout (no mask words, no keep in the GEMM prologue or dA)"),
    Case("attn-pad", _attention(padding=True), gate=True,
         doc="as attn, with a key padding mask"),
    Case("attn-rowprefix", _attention(per_row_prefix=True), gate=True,
         doc="as attn, a prefix per batch row (B, Hkv, P, D) instead of a shared one"),
    Case("attn-d64", _attention(D=64), gate=True, doc="as attn, D=64"),
    Case("attn-d256", _attention(D=256), gate=True,
         doc="as attn, D=256 (dK/dV by head-dim halves)"),
]
