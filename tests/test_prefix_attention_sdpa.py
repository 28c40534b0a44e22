"""The torch backend of prefix_attention on CUDA tensors: SDPA's fused kernels composed in
Python (lora_kernels/reference/prefix_attention_sdpa.py), differentiated by autograd.

On the CPU the same code runs on CPU tensors (SDPA_ON_CPU) against the float64 oracle, forward
and every gradient; the flash branch (bottom-right causal through the aten flash op, CUDA only)
runs with a stand-in for the kernel. The GPU tests assert that flash or memory-efficient
attention serves every case, forward and backward, and that nothing else runs.
"""

from __future__ import annotations

import logging
import sys

import pytest
import torch
from prefix_attention_cases import (
    NAMES,
    check_against_oracle,
    check_compiled_matches_eager,
    make_inputs,
    run_op,
)

from lora_kernels import prefix_attention
from lora_kernels.reference import prefix_attention as R
from lora_kernels.reference import prefix_attention_sdpa as S

op_module = sys.modules["lora_kernels.ops.prefix_attention"]

# (B, Hq, Hkv, Lq, Lk, P, per_row, D, pad, causal): each case a name, as the GPU test names them
CASES = {
    "causal square": (2, 4, 4, 9, 9, 0, False, 16, False, True),
    "causal Lq < Lk": (2, 4, 4, 5, 12, 0, False, 16, False, True),
    "one query": (2, 4, 2, 1, 12, 3, False, 16, False, True),
    "padding": (3, 4, 4, 9, 9, 0, False, 16, True, True),
    "padding, Lq < Lk, not causal": (3, 4, 2, 6, 11, 0, False, 24, True, False),
    "GQA": (2, 4, 1, 9, 9, 0, False, 16, False, True),
    "prefix shared": (2, 4, 2, 9, 9, 5, False, 16, False, True),
    "prefix per row, padding, GQA": (3, 4, 2, 7, 10, 4, True, 40, True, True),
    "prefix, not causal": (2, 4, 4, 6, 6, 3, False, 16, False, False),
}


@pytest.fixture
def sdpa_on_cpu(monkeypatch):
    monkeypatch.setattr(S, "SDPA_ON_CPU", True)


def case_inputs(case, dtype, device="cpu"):
    B, Hq, Hkv, Lq, Lk, P, per_row, D, pad, causal = CASES[case]
    inputs = make_inputs(B, Hq, Hkv, Lq, Lk, P, D, dtype, per_row=per_row, pad=pad)
    dout = torch.randn(B, Hq, Lq, D)
    moved = {n: (None if t is None else t.to(device)) for n, t in inputs.items()}
    return inputs, moved, dout, causal, D**-0.5


def _no_custom_op(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the SDPA path must not run the custom op")

    monkeypatch.setattr(op_module.backends, "load", refuse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_sdpa_path_matches_oracle(sdpa_on_cpu, monkeypatch, case, dtype):
    _no_custom_op(monkeypatch)
    inputs, _, dout, causal, scale = case_inputs(case, dtype)
    out, grads = run_op(inputs, dout, causal=causal)
    check_against_oracle(out, grads, inputs, causal, scale, dout)
    if inputs["key_padding_mask"] is not None and inputs["prefix_k"] is None:
        assert torch.equal(out[0], torch.zeros_like(out[0]))  # row 0 sees no key: exactly 0
        assert not grads["q"][0].any()


def test_sdpa_path_is_fused_on_cpu(sdpa_on_cpu):
    """On CPU tensors SDPA's CPU flash kernel serves every case: no softmax, no math path."""
    for case in CASES:
        inputs, _, dout, causal, _ = case_inputs(case, torch.float32)
        with torch.profiler.profile() as prof:
            run_op(inputs, dout, causal=causal)
        names = {e.name for e in prof.events()}
        assert "aten::_scaled_dot_product_flash_attention_for_cpu" in names, case
        assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward" in names, case
        assert not names & {"aten::_softmax", "aten::_scaled_dot_product_attention_math"}, case


def _fake_flash(q, k, v, dropout_p, is_causal, return_debug_mask, *, scale):
    """Stand-in for aten._scaled_dot_product_flash_attention on CPU tensors: FlashAttention 2's
    contract (bottom-right causal, grouped heads in place, head dim a multiple of 8)."""
    assert is_causal and dropout_p == 0.0 and q.shape[-1] % 8 == 0
    assert q.shape[1] % k.shape[1] == 0
    out = R.oracle(q, k, v, causal=True, scale=scale)
    return (out,)


@pytest.mark.parametrize("case", ["causal Lq < Lk", "prefix shared", "GQA", "one query"])
def test_flash_branch_logic(sdpa_on_cpu, monkeypatch, case):
    """The branch CUDA takes where flash serves, with the kernel stood in for: keys
    concatenated, grouped heads not repeated, head dim padded to a multiple of 8 and cut back."""
    monkeypatch.setattr(S, "flash_serves", lambda *args: True)
    calls = []

    def fake(q, k, v, *args, **kwargs):
        calls.append((q.shape, k.shape))
        return _fake_flash(q, k, v, *args, **kwargs)

    monkeypatch.setattr(S, "_flash_op", fake)
    B, Hq, Hkv, Lq, Lk, P, per_row, D, pad, causal = CASES[case]
    inputs = make_inputs(B, Hq, Hkv, Lq, Lk, P, 20, torch.float32, per_row=per_row)
    dout = torch.randn(B, Hq, Lq, 20)
    out, grads = run_op(inputs, dout, causal=True)
    check_against_oracle(out, grads, inputs, True, 20**-0.5, dout)
    bottom_right = 1 < Lq < Lk + P
    assert bool(calls) == bottom_right
    if calls:
        assert calls[0] == ((B, Hq, Lq, 24), (B, Hkv, P + Lk, 24))


def test_concat_keys_is_one_copy_in_repeat_kv_order():
    pk, k = torch.randn(1, 2, 3, 8), torch.randn(4, 2, 5, 8)
    keys = S.concat_keys(pk, k, 3)
    want = torch.cat([pk.expand(4, 2, 3, 8), k], 2).repeat_interleave(3, 1)
    assert torch.equal(keys, want)
    assert S.concat_keys(None, k, 1) is k


def test_empty_queries(sdpa_on_cpu):
    inputs = make_inputs(2, 2, 2, 0, 3, 2, 8, torch.float32, per_row=True)
    out, grads = run_op(inputs, torch.randn(2, 2, 0, 8))
    assert out.shape == (2, 2, 0, 8)
    for n, g in grads.items():
        assert g is not None and g.shape == inputs[n].shape and not g.any(), n


def test_dropout_is_sdpa_own(sdpa_on_cpu, caplog):
    """Dropout goes to SDPA's dropout_p (not the oracle): random, finite gradients, off in eval."""
    inputs = make_inputs(2, 2, 2, 6, 6, 4, 16, torch.float32)
    t = [inputs[n].clone().requires_grad_() for n in NAMES]
    plain = prefix_attention(*t)
    op_module._dropout_logged = False
    with caplog.at_level(logging.DEBUG, logger="lora_kernels"):
        dropped = prefix_attention(*t, dropout_p=0.5)
    assert not any("dropout" in r.getMessage() for r in caplog.records)
    assert not torch.allclose(dropped, plain)
    torch.testing.assert_close(prefix_attention(*t, dropout_p=0.5, training=False), plain)
    dropped.sum().backward()
    assert all(torch.isfinite(a.grad).all() for a in t)


@pytest.mark.parametrize("pad", [False, True])
def test_compile_fullgraph(sdpa_on_cpu, pad):
    """torch.compile traces the SDPA path in one graph, forward and backward."""
    torch._dynamo.reset()
    inputs = make_inputs(2, 4, 2, 9, 11, 5, 16, torch.float32, pad=pad)
    dout = torch.randn(2, 4, 9, 16)
    check_compiled_matches_eager(inputs, dout)


# ---- on a GPU --------------------------------------------------------------------------------

FUSED_FORWARD = {"aten::_scaled_dot_product_flash_attention",
                 "aten::_scaled_dot_product_efficient_attention", "aten::_efficient_attention_forward"}
FUSED_BACKWARD = {"aten::_scaled_dot_product_flash_attention_backward",
                  "aten::_scaled_dot_product_efficient_attention_backward",
                  "aten::_efficient_attention_backward"}
NOT_FUSED = {"aten::_scaled_dot_product_attention_math", "aten::_softmax", "aten::logsumexp"}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_kernels_serve_every_case_on_cuda(case, dtype):
    """Inside sdpa_kernel([FLASH, EFFICIENT]) (SDPA raises if neither serves) the torch backend
    runs a fused forward and backward kernel and nothing that materialises scores; the result
    and every gradient match the float64 oracle."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    inputs, cuda, dout, causal, scale = case_inputs(case, dtype, "cuda")
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out, grads = run_op(cuda, dout.cuda(), causal=causal, backend="torch")
    names = {e.name for e in prof.events()}
    assert names & FUSED_FORWARD and names & FUSED_BACKWARD, sorted(names)
    assert not names & NOT_FUSED, sorted(names & NOT_FUSED)
    check_against_oracle(out.cpu(), {n: None if g is None else g.cpu() for n, g in grads.items()},
                         inputs, causal, scale, dout)


@pytest.mark.gpu
def test_flash_serves_unpadded_bf16_on_cuda():
    """bf16, no padding: flash itself (bottom-right causal with a prefix, GQA in place)."""
    inputs, cuda, dout, causal, _ = case_inputs("prefix shared", torch.bfloat16, "cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run_op(cuda, dout.cuda(), causal=causal, backend="torch")
    names = {e.name for e in prof.events()}
    assert "aten::_scaled_dot_product_flash_attention" in names
    assert "aten::_scaled_dot_product_flash_attention_backward" in names


@pytest.mark.gpu
def test_compile_inductor_on_cuda():
    torch._dynamo.reset()
    inputs, cuda, dout, causal, _ = case_inputs("prefix per row, padding, GQA", torch.bfloat16,
                                                "cuda")
    args = [cuda[n] for n in NAMES]
    fn = torch.compile(lambda *a, m: prefix_attention(*a, key_padding_mask=m), fullgraph=True)
    torch.testing.assert_close(fn(*args, m=cuda["key_padding_mask"]),
                               prefix_attention(*args, key_padding_mask=cuda["key_padding_mask"]))
    unpadded = case_inputs("prefix shared", torch.bfloat16, "cuda")[1]
    args = [unpadded[n] for n in NAMES]
    torch.testing.assert_close(fn(*args, m=None), prefix_attention(*args))
