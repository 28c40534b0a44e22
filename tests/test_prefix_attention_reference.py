"""The oracle of prefix_attention against an independent computation, and the torch backend's
CPU path (split flash attention merged by log-sum-exp) against the float64 oracle. The CUDA path
of the torch backend (SDPA) is tested in test_prefix_attention_sdpa.py."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from prefix_attention_cases import NAMES, check_against_oracle, make_inputs

from lora_kernels.reference import prefix_attention as R

PREFIXES = [(0, False), (1, False), (13, False), (13, True)]
HEADS_D = [(4, 4, 16), (4, 2, 40), (4, 1, 64)]
LENGTHS = [(1, 9), (17, 17), (17, 23)]


def sdpa_concat(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale):
    """The PEFT-like path: prefix expanded per row and concatenated, an explicit mask."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    keep = torch.ones(B, 1, Lq, Lk, dtype=torch.bool)
    if causal:
        keep = keep & torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq)
    if key_padding_mask is not None:
        keep = keep & key_padding_mask[:, None, None, :]
    if prefix_k is not None:
        P = prefix_k.shape[-2]
        k = torch.cat([prefix_k.expand(B, Hkv, P, D), k], 2)
        v = torch.cat([prefix_v.expand(B, Hkv, P, D), v], 2)
        keep = torch.cat([torch.ones(B, 1, Lq, P, dtype=torch.bool), keep], -1)
    g = Hq // Hkv
    return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1),
                                          v.repeat_interleave(g, 1), attn_mask=keep,
                                          scale=scale)


@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("prefix", PREFIXES)
def test_oracle_matches_sdpa_on_concatenated_keys(prefix, causal, pad):
    P, per_row = prefix
    inputs = make_inputs(3, 4, 2, 17, 23, P, 16, torch.float64, per_row=per_row, pad=pad)
    out = R.oracle(**inputs, causal=causal, scale=0.3)
    ref = sdpa_concat(**inputs, causal=causal, scale=0.3)
    # older SDPA versions give NaN on a row that sees no key, newer ones 0
    torch.testing.assert_close(out, ref.nan_to_num(0.0), rtol=1e-12, atol=1e-12)
    if pad and P == 0:
        assert torch.equal(out[0], torch.zeros_like(out[0]))


@pytest.mark.parametrize("Lq,Lk", [(1, 1), (1, 7), (5, 5), (5, 9), (0, 3)])
def test_causal_keep_is_bottom_right(Lq, Lk):
    """The package's one causal mask equals PyTorch's bottom-right causal bias and the tril form."""
    from torch.nn.attention.bias import causal_lower_right

    keep = R.causal_keep(Lq, Lk, "cpu")
    assert keep.dtype == torch.bool
    assert torch.equal(keep, torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq))
    if Lq:
        assert torch.equal(keep, causal_lower_right(Lq, Lk)._materialize())


def test_oracle_lse_and_empty_rows():
    inputs = make_inputs(2, 2, 2, 3, 5, 0, 8, torch.float64, pad=True)
    out, lse = R.oracle(**inputs, causal=True, scale=0.5, return_lse=True)
    assert torch.isneginf(lse[0]).all() and torch.equal(out[0], torch.zeros_like(out[0]))
    s = (inputs["q"][1] @ inputs["k"][1].mT) * 0.5
    keep = torch.ones(3, 5, dtype=torch.bool).tril(2) & inputs["key_padding_mask"][1]
    torch.testing.assert_close(lse[1], torch.logsumexp(s.masked_fill(~keep, -torch.inf), -1))


def test_prefix_changes_the_result():
    """The grids below would catch a kernel that drops the prefix."""
    inputs = make_inputs(2, 4, 2, 17, 17, 13, 16, torch.float64)
    with_prefix = R.oracle(**inputs, causal=True)
    without = R.oracle(**{**inputs, "prefix_k": None, "prefix_v": None}, causal=True)
    assert (with_prefix - without).abs().max() > 0.1


def run_fast_path(inputs, causal, scale, dout):
    t = inputs
    out, lse = R.forward(t["q"], t["k"], t["v"], t["prefix_k"], t["prefix_v"],
                         t["key_padding_mask"], causal, scale)
    grads = R.backward(dout.to(out.dtype), t["q"], t["k"], t["v"], t["prefix_k"],
                       t["prefix_v"], t["key_padding_mask"], out, lse, causal, scale)
    return out, lse, dict(zip(NAMES, grads))


def _fast_case(prefix, heads_d, lengths, causal, pad, dtype, B=3):
    (P, per_row), (Hq, Hkv, D), (Lq, Lk) = prefix, heads_d, lengths
    inputs = make_inputs(B, Hq, Hkv, Lq, Lk, P, D, dtype, per_row=per_row, pad=pad)
    dout = torch.randn(B, Hq, Lq, D)
    out, lse, grads = run_fast_path(inputs, causal, D**-0.5, dout)
    check_against_oracle(out, grads, inputs, causal, D**-0.5, dout)
    _, ref_lse = R.oracle(**{n: (x if x is None or x.dtype == torch.bool else x.double())
                             for n, x in inputs.items()}, causal=causal, scale=D**-0.5,
                          return_lse=True)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    seen = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[seen].double(), ref_lse[seen], rtol=0, atol=1e-4)


@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize("heads_d", HEADS_D)
@pytest.mark.parametrize("prefix", PREFIXES)
def test_fast_path_fp32_grid(prefix, heads_d, lengths, causal, pad):
    _fast_case(prefix, heads_d, lengths, causal, pad, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("prefix,heads_d,lengths,causal,pad", [
    (p, h, ln, c, pad) for (p, h, ln), c, pad in itertools.product(
        zip(PREFIXES[1:] + PREFIXES[:1], HEADS_D + HEADS_D[:1], LENGTHS + LENGTHS[2:]),
        [False, True], [False, True])
])
def test_fast_path_half_precision(prefix, heads_d, lengths, causal, pad, dtype):
    _fast_case(prefix, heads_d, lengths, causal, pad, dtype)


@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("lengths", [(17, 17), (23, 30), (9, 9)])
@pytest.mark.parametrize("prefix", [(0, False), (5, False), (5, True)])
def test_fast_path_causal_chunks(monkeypatch, prefix, lengths, pad):
    """The causal split of the queries into chunks, forced on at small sizes."""
    monkeypatch.setattr(R, "CHUNK_ROWS", 4)
    assert len(R._causal_chunks(lengths[0], lengths[1], True)) > 1
    _fast_case(prefix, (4, 2, 16), lengths, True, pad, torch.float32)


def test_fast_path_float64_matches_oracle_exactly():
    inputs = make_inputs(2, 4, 2, 17, 23, 13, 16, torch.float64, pad=True)
    dout = torch.randn(2, 4, 17, 16, dtype=torch.float64)
    out, _, grads = run_fast_path(inputs, True, 0.25, dout)
    tensors = {n: (None if inputs[n] is None else inputs[n].clone().requires_grad_())
               for n in NAMES}
    ref = R.oracle(**tensors, key_padding_mask=inputs["key_padding_mask"], causal=True,
                   scale=0.25)
    ref_grads = torch.autograd.grad(ref, [tensors[n] for n in NAMES], dout)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for n, g in zip(NAMES, ref_grads):
        torch.testing.assert_close(grads[n], g, rtol=1e-10, atol=1e-10)


def test_fast_path_does_not_concatenate_keys(monkeypatch):
    """The fast path never concatenates the prefix with the keys (PEFT's path does)."""
    inputs = make_inputs(2, 4, 4, 17, 17, 5, 16, torch.float32)
    real_cat = torch.cat
    shapes = []

    def spy(tensors, *args, **kwargs):
        shapes.extend(t.shape for t in tensors)
        return real_cat(tensors, *args, **kwargs)

    monkeypatch.setattr(torch, "cat", spy)
    run_fast_path(inputs, True, 0.25, torch.randn(2, 4, 17, 16))
    assert inputs["k"].shape not in shapes and inputs["prefix_k"].shape not in shapes


@pytest.mark.parametrize("prefix", [(0, False), (5, True), (5, False)])
def test_off_cpu_path_recomputes_the_oracle(monkeypatch, prefix):
    """Called directly off the CPU (no CPU flash kernel) the custom op's torch backend runs the
    oracle; forced here."""
    monkeypatch.setattr(R, "_cpu_flash", lambda q: False)
    _fast_case(prefix, (4, 2, 16), (9, 12), True, True, torch.float32)
    _fast_case(prefix, (4, 2, 16), (9, 12), True, True, torch.bfloat16)
