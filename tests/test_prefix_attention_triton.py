"""The Triton kernels of prefix_attention (in Triton's interpreter on the CPU) against the
float64 oracle: output and the gradients of q, k, v, prefix_k, prefix_v."""

from __future__ import annotations

import pytest
import torch
from prefix_attention_cases import check_against_oracle, make_inputs

from lora_kernels import backends

pytestmark = pytest.mark.skipif(
    bool(backends.triton_available_reasons(torch.device("cuda" if torch.cuda.is_available()
                                                        else "cpu"))),
    reason="Triton cannot run here")

# (P, per_row): no prefix, a shared prefix of 1 and of 13, a per-row prefix of 13
PREFIXES = [(0, False), (1, False), (13, False), (13, True)]
# (Hq, Hkv, D): each head grouping with each head dim over the grid below
HEADS_D = [(4, 4, 16), (4, 2, 40), (4, 1, 64)]
# (Lq, Lk): a decoding step with a cache, a square, queries at the end of longer keys
LENGTHS = [(1, 9), (17, 17), (17, 23)]


def run_triton(inputs, causal, scale, dout, device="cpu"):
    from lora_kernels.triton import prefix_attention as T

    t = {n: (None if x is None else x.to(device)) for n, x in inputs.items()}
    out, lse = T.forward(t["q"], t["k"], t["v"], t["prefix_k"], t["prefix_v"],
                         t["key_padding_mask"], causal, scale)
    grads = T.backward(dout.to(out.dtype).to(device), t["q"], t["k"], t["v"], t["prefix_k"],
                       t["prefix_v"], t["key_padding_mask"], out, lse, causal, scale)
    names = ("q", "k", "v", "prefix_k", "prefix_v")
    return out.cpu(), lse.cpu(), {n: (None if g is None else g.cpu()) for n, g in zip(names, grads)}


def _case(prefix, heads_d, lengths, causal, pad, dtype, B=2):
    (P, per_row), (Hq, Hkv, D), (Lq, Lk) = prefix, heads_d, lengths
    inputs = make_inputs(B, Hq, Hkv, Lq, Lk, P, D, dtype, per_row=per_row, pad=pad)
    dout = torch.randn(B, Hq, Lq, D)
    scale = D**-0.5
    out, _, grads = run_triton(inputs, causal, scale, dout)
    check_against_oracle(out, grads, inputs, causal, scale, dout)


def _covering_grid():
    """Every prefix kind x causal x padding, each with a head grouping/head dim and lengths
    that rotate so that every (Hq/Hkv, D) and every (Lq, Lk) meets both causal modes and both
    padding modes (the interpreter runs each program as a Python loop: the full cross product
    would take minutes; tests/test_prefix_attention_reference.py runs it for the torch path)."""
    cases = []
    for i, prefix in enumerate(PREFIXES):
        for causal in (False, True):
            for pad in (False, True):
                heads_d = HEADS_D[(i + 2 * causal + pad) % 3]
                lengths = LENGTHS[(i + causal + 2 * pad) % 3]
                cases.append((prefix, heads_d, lengths, causal, pad))
    return cases


@pytest.mark.parametrize("prefix,heads_d,lengths,causal,pad", _covering_grid())
def test_fp32_grid(prefix, heads_d, lengths, causal, pad):
    _case(prefix, heads_d, lengths, causal, pad, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads_d,lengths,causal,pad", [
    ((4, 2, 40), (17, 23), True, True),
    ((4, 1, 64), (1, 9), True, False),
    ((4, 4, 16), (17, 17), False, True),
])
@pytest.mark.parametrize("prefix", [(13, False), (13, True), (0, False)])
def test_half_precision(prefix, heads_d, lengths, causal, pad, dtype):
    _case(prefix, heads_d, lengths, causal, pad, dtype)


def test_lse_and_empty_rows():
    """LSE is the natural-log log-sum-exp; a row that sees no key gives 0 and -inf."""
    inputs = make_inputs(2, 4, 2, 5, 7, 0, 16, torch.float32, pad=True)
    dout = torch.randn(2, 4, 5, 16)
    out, lse, grads = run_triton(inputs, True, 0.25, dout)
    from lora_kernels.reference.prefix_attention import oracle

    ref, ref_lse = oracle(**{n: (x if x is None or x.dtype == torch.bool else x.double())
                             for n, x in inputs.items()}, causal=True, scale=0.25,
                          return_lse=True)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.isneginf(lse[0]).all() and torch.isfinite(lse[1]).all()
    torch.testing.assert_close(lse[1].double(), ref_lse[1], rtol=0, atol=1e-5)
    assert torch.equal(grads["q"][0], torch.zeros_like(grads["q"][0]))


def test_strided_and_expanded_inputs():
    """Non-contiguous q/k/v (a (B, L, H, D) layout seen as (B, H, L, D)) and an expanded
    shared prefix (batch stride 0) are read in place."""
    B, Hq, Hkv, L, P, D = 2, 4, 2, 9, 5, 24
    q = torch.randn(B, L, Hq, D).transpose(1, 2)
    k = torch.randn(B, L, Hkv, D).transpose(1, 2)
    v = torch.randn(B, L, Hkv, 2 * D)[..., ::2].transpose(1, 2)
    pk, pv = torch.randn(1, Hkv, P, D), torch.randn(1, Hkv, P, D)
    inputs = dict(q=q, k=k, v=v, prefix_k=pk, prefix_v=pv, key_padding_mask=None)
    dout = torch.randn(B, Hq, L, D)
    out, _, grads = run_triton(inputs, True, D**-0.5, dout)
    check_against_oracle(out, grads, inputs, True, D**-0.5, dout)


def test_head_dims_not_powers_of_two():
    for D in (80, 96):
        inputs = make_inputs(1, 2, 1, 3, 5, 2, D, torch.float32)
        dout = torch.randn(1, 2, 3, D)
        out, _, grads = run_triton(inputs, True, D**-0.5, dout)
        check_against_oracle(out, grads, inputs, True, D**-0.5, dout)


@pytest.mark.parametrize("splits", [2, 3])
def test_shared_prefix_gradient_split_over_the_batch(monkeypatch, splits):
    """The shared prefix's gradient from partial sums over splits of the batch (the GPU path)."""
    from lora_kernels.triton import prefix_attention as T

    monkeypatch.setattr(T, "PREFIX_BATCH_SPLITS", splits)
    inputs = make_inputs(5, 4, 2, 9, 11, 13, 16, torch.float32, pad=True)
    dout = torch.randn(5, 4, 9, 16)
    out, _, grads = run_triton(inputs, True, 0.25, dout)
    check_against_oracle(out, grads, inputs, True, 0.25, dout)


def test_deterministic_prefix_gradient():
    inputs = make_inputs(3, 4, 2, 17, 17, 13, 16, torch.float32)
    dout = torch.randn(3, 4, 17, 16)
    _, _, g1 = run_triton(inputs, True, 0.25, dout)
    _, _, g2 = run_triton(inputs, True, 0.25, dout)
    assert torch.equal(g1["prefix_k"], g2["prefix_k"])
    assert torch.equal(g1["prefix_v"], g2["prefix_v"])


# ---- GPU checks at realistic sizes (skip without a GPU) ----------------------------------
# Many blocks per program, bf16/fp16 tensor-core dots, odd head dims and lengths. One autotune
# config per specialisation (LORA_KERNELS_AUTOTUNE=0) keeps the compile time of the GPU check
# short; the benchmark autotunes.


@pytest.fixture
def quick_tune(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_AUTOTUNE", "0")


@pytest.mark.gpu
@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,P,D,per_row,causal,pad,dtype", [
    (4, 16, 4, 512, 512, 32, 128, False, True, False, torch.bfloat16),
    (2, 8, 8, 300, 700, 20, 80, True, True, True, torch.float16),
    (3, 8, 2, 257, 257, 0, 96, False, False, True, torch.bfloat16),
    (2, 4, 4, 1, 1000, 64, 256, False, True, False, torch.bfloat16),
    (2, 8, 2, 333, 401, 45, 64, False, True, True, torch.float32),
])
def test_gpu_realistic(quick_tune, B, Hq, Hkv, Lq, Lk, P, D, per_row, causal, pad, dtype):
    inputs = make_inputs(B, Hq, Hkv, Lq, Lk, P, D, dtype, per_row=per_row, pad=pad)
    dout = torch.randn(B, Hq, Lq, D)
    out, _, grads = run_triton(inputs, causal, D**-0.5, dout, device="cuda")
    check_against_oracle(out, grads, inputs, causal, D**-0.5, dout)
