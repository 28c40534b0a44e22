"""What the sm_90 profile compiles: launcher calls at the benchmark shapes (``PROFILE_CASES``).

Convention: one ``Case`` per launcher call sequence. ``run`` calls the package's own launchers
(``forward``/``backward`` of a Triton backend module) on ``meta`` tensors (shapes and dtypes, no
storage); ``capture.recording`` intercepts every kernel launch they make, so each kernel is
compiled with exactly the arguments, constexprs and autotune configs the launcher produces at
that shape. When a kernel or launcher changes, nothing here needs to change unless the launcher's
signature does; a new kernel needs a case only if no existing case launches it (the profile
fails, naming it, when a kernel of ``lora_kernels/triton/`` is launched by no case).

``gate=True`` cases are the ones ``tests/test_sm90_gate.py`` enforces (the benchmark shapes);
the others are profiled for the record only (slower to compile, off the CI budget).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .capture import meta

# Benchmark shapes (benchmarks/README.md): LoRA T=8192, in=out=4096, r=16, p=0.1, alpha=32;
# prefix attention B8 Hq32 Hkv8 L1024 P32 D128, causal, shared prefix.
LORA = dict(T=8192, IN=4096, OUT=4096, R=16, P=0.1, ALPHA=32.0)
ATTN = dict(B=8, HQ=32, HKV=8, L=1024, P=32, D=128)
H200_SMS = 132
SEED = 0x5DEECE66D1234567  # any 63-bit seed: the launcher passes it as an i64


@dataclass
class Case:
    name: str
    run: Callable[[], None]
    gate: bool
    doc: str


def _lora(base=torch.bfloat16, adapters=torch.float32, needs=(True, False, False, True, True)):
    def run():
        from lora_kernels.triton import lora_linear as k
        T, IN, OUT, R = LORA["T"], LORA["IN"], LORA["OUT"], LORA["R"]
        x, w = meta(T, IN, dtype=base), meta(OUT, IN, dtype=base)
        a, b = meta(R, IN, dtype=adapters), meta(OUT, R, dtype=adapters)
        scaling = LORA["ALPHA"] / R
        y, s = k.forward(x, w, None, a, b, scaling, LORA["P"], SEED)
        k.backward(meta(T, OUT, dtype=base), x, w, a, b, s, scaling, LORA["P"], SEED, needs)
    return run


def _attention(dtype=torch.bfloat16, D=ATTN["D"], padding=False):
    def run():
        from lora_kernels.triton import prefix_attention as k
        B, HQ, HKV, L, P = ATTN["B"], ATTN["HQ"], ATTN["HKV"], ATTN["L"], ATTN["P"]
        q, dout = meta(B, HQ, L, D, dtype=dtype), meta(B, HQ, L, D, dtype=dtype)
        kk, v = meta(B, HKV, L, D, dtype=dtype), meta(B, HKV, L, D, dtype=dtype)
        pk, pv = meta(1, HKV, P, D, dtype=dtype), meta(1, HKV, P, D, dtype=dtype)
        mask = meta(B, L, dtype=torch.bool) if padding else None
        scale = 1.0 / math.sqrt(D)
        # the split of the batch _prefix_batch_splits picks on a 132-SM GPU (meta tensors are
        # not on a GPU, so the launcher would pick 1)
        saved = k.PREFIX_BATCH_SPLITS
        k.PREFIX_BATCH_SPLITS = max(1, min(B, H200_SMS // (HKV * -(-P // 64))))
        try:
            out, lse = k.forward(q, kk, v, pk, pv, mask, True, scale)
            k.backward(dout, q, kk, v, pk, pv, mask, out, lse, True, scale)
        finally:
            k.PREFIX_BATCH_SPLITS = saved
    return run


PROFILE_CASES: list[Case] = [
    Case("lora", _lora(), gate=True,
         doc="LoRA fwd+bwd, bf16 x/W, fp32 adapters (PEFT's default), frozen W (no dW), "
             "T=8192 in=out=4096 r=16 p=0.1"),
    Case("attn", _attention(), gate=True,
         doc="prefix attention fwd+bwd, bf16, B8 Hq32 Hkv8 L1024 P32 D128, causal, shared prefix"),
    Case("lora-bf16A", _lora(adapters=torch.bfloat16), gate=False,
         doc="as lora, adapters in bf16 (PEFT with autocast_adapter_dtype=False)"),
    Case("attn-pad", _attention(padding=True), gate=False,
         doc="as attn, with a key padding mask"),
]
