"""GPU checks of the Triton prefix-attention kernels at realistic sizes (skipped without a GPU):
every kernel (forward, decode with and without split-K and its merge, delta, dK/dV with the
prefix programs, dQ from the stored dS and recomputed) against the float64 oracle, with many
tiles per program, tensor-core dots in fp16/bf16, odd head dims and lengths. One autotune config
per specialisation (LORA_KERNELS_AUTOTUNE=0) keeps the compile time short; the benchmark
autotunes."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close_to_reference
from prefix_attention_cases import check_against_oracle, make_inputs, run_triton

from lora_kernels.reference.prefix_attention import oracle

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def quick_tune(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_AUTOTUNE", "0")


def _check(inputs, causal, dout, device="cuda"):
    D = inputs["q"].shape[-1]
    out, _, grads = run_triton(inputs, causal, D**-0.5, dout, device=device)
    check_against_oracle(out, grads, inputs, causal, D**-0.5, dout)


@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,P,D,per_row,causal,pad,dtype", [
    (8, 32, 8, 1024, 1024, 32, 128, False, True, False, torch.bfloat16),  # benchmark shape
    (2, 8, 8, 300, 700, 20, 80, True, True, True, torch.float16),
    (3, 8, 2, 257, 257, 0, 96, False, False, True, torch.bfloat16),
    (2, 8, 2, 333, 401, 45, 64, False, True, True, torch.float32),
    (2, 4, 4, 200, 300, 100, 256, False, True, False, torch.bfloat16),
])
def test_forward_backward(B, Hq, Hkv, Lq, Lk, P, D, per_row, causal, pad, dtype):
    inputs = make_inputs(B, Hq, Hkv, Lq, Lk, P, D, dtype, per_row=per_row, pad=pad)
    _check(inputs, causal, torch.randn(B, Hq, Lq, D))


@pytest.mark.parametrize("B,Lq,Lk,pad,split", [
    (2, 1, 4096, False, True),     # few (batch, kv head) pairs: keys split over programs
    (2, 16, 3000, True, True),
    (64, 4, 1500, True, False),    # enough programs without a split
])
def test_decode(B, Lq, Lk, pad, split):
    from lora_kernels.triton import attention_decode

    Hq, Hkv, D = 32, 8, 128
    G = Hq // Hkv
    row_blocks = -(-G * Lq // attention_decode.decode_rows(G, Lq))
    n = attention_decode.plan_splits(B, Hkv, row_blocks, Lk, torch.device("cuda"))[0]
    assert (n > 1) == split
    inputs = make_inputs(B, Hq, Hkv, Lq, Lk, 32, D, torch.bfloat16, pad=pad)
    _check(inputs, True, torch.randn(B, Hq, Lq, D))


def test_dq_recomputed(monkeypatch):
    from lora_kernels.triton import prefix_attention as T

    monkeypatch.setattr(T, "DS_WORKSPACE_BYTES", 0)
    inputs = make_inputs(2, 16, 4, 500, 600, 32, 128, torch.bfloat16, pad=True)
    _check(inputs, True, torch.randn(2, 16, 500, 128))


def test_deterministic():
    """No atomics: two runs give bitwise equal gradients (the shared prefix's included)."""
    inputs = make_inputs(4, 16, 4, 400, 400, 32, 128, torch.bfloat16)
    dout = torch.randn(4, 16, 400, 128)
    _, _, g1 = run_triton(inputs, True, 128**-0.5, dout, device="cuda")
    _, _, g2 = run_triton(inputs, True, 128**-0.5, dout, device="cuda")
    for name, g in g1.items():
        assert torch.equal(g, g2[name]), name


def test_decoding_a_batch_of_4096():
    """B * Hkv = 32,768 programs, once on a grid axis limited to 65,535 (and B * Hq beyond)."""
    B, Hq, Hkv, Lk, P, D = 4096, 32, 8, 40, 8, 64
    inputs = make_inputs(B, Hq, Hkv, 1, Lk, P, D, torch.bfloat16)
    from lora_kernels.triton import prefix_attention as T

    t = {n: (None if x is None else x.cuda()) for n, x in inputs.items()}
    out, _ = T.forward(t["q"], t["k"], t["v"], t["prefix_k"], t["prefix_v"], None, True, D**-0.5)
    f64 = {n: (None if x is None else x.double()) for n, x in inputs.items()}
    f64["key_padding_mask"] = None
    ref = oracle(**f64, causal=True, scale=D**-0.5)
    base = oracle(**inputs, causal=True, scale=D**-0.5)
    assert_close_to_reference(out.cpu(), ref, base, "out")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_inputs_on_another_gpu():
    """The launches follow the inputs' device, not the current one."""
    inputs = make_inputs(2, 8, 2, 100, 130, 16, 64, torch.float16, pad=True)
    torch.cuda.set_device(0)
    _check(inputs, True, torch.randn(2, 8, 100, 64), device="cuda:1")
