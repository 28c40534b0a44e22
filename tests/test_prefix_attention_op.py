"""The public prefix_attention op: dispatch, the custom op (opcheck, autograd,
torch.compile), dropout, and every bad-input error."""

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

import lora_kernels
from lora_kernels import backends, prefix_attention

op_module = sys.modules["lora_kernels.ops.prefix_attention"]
HAS_TRITON = not backends.triton_available_reasons(torch.device("cpu"))
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not HAS_TRITON, reason="Triton cannot run on the CPU here"))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("P,per_row,shared_3d", [(13, False, True), (5, True, False),
                                                 (0, False, False)])
def test_op_matches_oracle(backend, dtype, P, per_row, shared_3d):
    inputs = make_inputs(2, 4, 2, 9, 12, P, 24, dtype, per_row=per_row, pad=True,
                         shared_3d=shared_3d)
    dout = torch.randn(2, 4, 9, 24)
    out, grads = run_op(inputs, dout, causal=True, backend=backend)
    check_against_oracle(out, grads, inputs, True, 24**-0.5, dout)
    if P:
        assert grads["prefix_k"].shape == inputs["prefix_k"].shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_changes_the_output(backend):
    inputs = make_inputs(2, 4, 4, 9, 9, 7, 16, torch.float32)
    dout = torch.randn(2, 4, 9, 16)
    with_prefix, _ = run_op(inputs, dout, backend=backend)
    without, _ = run_op({**inputs, "prefix_k": None, "prefix_v": None}, dout, backend=backend)
    assert (with_prefix - without).abs().max() > 0.1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,Lq,Lk,P,causal", [(2, 0, 3, 2, True), (2, 0, 0, 2, False),
                                              (0, 3, 4, 2, True), (2, 0, 3, 0, False)])
def test_empty_queries_or_batch(backend, B, Lq, Lk, P, causal):
    """No query (Lq = 0, a decode step with nothing new) or no batch row: an empty output
    and zero gradients (PyTorch's CPU flash kernel dies of SIGFPE on Lq = 0 when called)."""
    inputs = make_inputs(B, 2, 2, Lq, Lk, P, 8, torch.float32, per_row=True)
    out, grads = run_op(inputs, torch.randn(B, 2, Lq, 8), causal=causal, backend=backend)
    assert out.shape == (B, 2, Lq, 8)
    for n, g in grads.items():
        if inputs[n] is not None and inputs[n].numel():
            assert g is not None and g.shape == inputs[n].shape and not g.any(), n


@pytest.mark.parametrize("P,per_row", [(5, False), (0, False), (3, True)])
def test_custom_op_torch_backend_off_cpu(monkeypatch, P, per_row):
    """The custom op called with the torch backend off the CPU (forced here; the public op takes
    the SDPA path there) recomputes the oracle for its backward; inside the custom op autograd
    is off whatever the grad mode, so that must not need it."""
    monkeypatch.setattr(sys.modules["lora_kernels.reference.prefix_attention"], "_cpu_flash",
                        lambda q: False)
    inputs = make_inputs(2, 4, 2, 5, 7, P, 8, torch.float32, per_row=per_row, pad=True)
    dout = torch.randn(2, 4, 5, 8)
    out, grads = run_op(inputs, dout, causal=True, backend="torch")
    check_against_oracle(out, grads, inputs, True, 8**-0.5, dout)


@pytest.mark.parametrize("sdpa_path", [False, True])
def test_autocast_casts_inputs_as_sdpa_and_stays_out_of_the_backend(monkeypatch, sdpa_path):
    """Under autocast the op takes its inputs in the autocast dtype, as SDPA would (so q, k in
    fp32 after RoPE and v in bf16 mix freely), then computes exactly as on bf16 inputs outside
    autocast (the SDPA path, used on CUDA, must not be recast inside either)."""
    if sdpa_path:
        monkeypatch.setattr(sys.modules["lora_kernels.reference.prefix_attention_sdpa"],
                            "SDPA_ON_CPU", True)
    inputs = make_inputs(2, 2, 2, 5, 5, 3, 16, torch.float32, per_row=True, pad=True)
    dout = torch.randn(2, 2, 5, 16)
    as_bf16 = {n: (t.to(torch.bfloat16) if t is not None and t.is_floating_point() else t)
               for n, t in inputs.items()}
    out, grads = run_op(as_bf16, dout, backend="torch")
    mixed = {**inputs, "v": as_bf16["v"]}  # LLaMA under autocast: q, k fp32, v bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ac, grads_ac = run_op(mixed, dout, backend="torch")
    assert out_ac.dtype == torch.bfloat16 and torch.equal(out_ac, out)
    for n, g in grads.items():
        assert (g is None and grads_ac[n] is None) or torch.equal(grads_ac[n].to(g.dtype), g), n


def test_defaults_and_empty_prefix():
    """scale defaults to D ** -0.5; a prefix with P = 0 is no prefix; causal is on."""
    inputs = make_inputs(2, 2, 2, 5, 5, 0, 16, torch.float32)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    base = prefix_attention(q, k, v, causal=True, scale=0.25)
    torch.testing.assert_close(prefix_attention(q, k, v), base)
    empty = torch.randn(2, 0, 16)
    torch.testing.assert_close(prefix_attention(q, k, v, empty, empty), base)
    assert not torch.allclose(prefix_attention(q, k, v, causal=False), base)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("P,pad,causal", [(3, True, True), (0, False, False)])
def test_opcheck(backend, P, pad, causal):
    inputs = make_inputs(2, 4, 2, 3, 5, P, 16, torch.float32, pad=pad)
    t = {n: (None if inputs[n] is None else inputs[n].requires_grad_()) for n in NAMES}
    torch.library.opcheck(op_module._fwd_op, (t["q"], t["k"], t["v"], t["prefix_k"],
                                              t["prefix_v"], inputs["key_padding_mask"], causal,
                                              0.25, backend))


def test_compile_fullgraph_with_backward():
    """torch.compile traces the op in one graph, forward and backward (torch backend on the
    CPU; Triton under compile needs a GPU, see test_compile_triton_gpu). aot_eager: dynamo and
    AOT autograd through the fake and autograd registrations, without inductor's C++ build."""
    inputs = make_inputs(2, 4, 2, 9, 11, 5, 16, torch.float32, pad=True)
    dout = torch.randn(2, 4, 9, 16)
    check_compiled_matches_eager(inputs, dout, causal=True)


@pytest.mark.gpu
def test_compile_triton_gpu(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_AUTOTUNE", "0")
    inputs = make_inputs(2, 8, 2, 200, 260, 16, 64, torch.bfloat16, pad=True)
    cuda = {n: (None if x is None else x.cuda()) for n, x in inputs.items()}
    fn = torch.compile(lambda q, k, v, pk, pv, m: prefix_attention(
        q, k, v, pk, pv, key_padding_mask=m, backend="triton"), fullgraph=True)
    out = fn(*(cuda[n] for n in NAMES), cuda["key_padding_mask"])
    ref = prefix_attention(*(cuda[n] for n in NAMES), key_padding_mask=cuda["key_padding_mask"],
                           backend="triton")
    torch.testing.assert_close(out, ref)


def test_dropout_runs_the_reference(caplog):
    inputs = make_inputs(2, 2, 2, 6, 6, 4, 16, torch.float32)
    t = {n: inputs[n].clone().requires_grad_() for n in NAMES}
    args = [t[n] for n in NAMES]
    plain = prefix_attention(*args)
    op_module._dropout_logged = False
    with caplog.at_level(logging.DEBUG, logger="lora_kernels"):
        torch.manual_seed(1)
        dropped = prefix_attention(*args, dropout_p=0.5)
        torch.manual_seed(1)
        again = prefix_attention(*args, dropout_p=0.5)
        prefix_attention(*args, dropout_p=0.5)
    assert sum("dropout" in r.getMessage() for r in caplog.records) == 1
    torch.testing.assert_close(dropped, again)
    assert not torch.allclose(dropped, plain)
    torch.testing.assert_close(prefix_attention(*args, dropout_p=0.5, training=False), plain)
    dropped.sum().backward()
    assert all(torch.isfinite(a.grad).all() for a in args)


def test_backend_choice():
    inputs = make_inputs(1, 2, 2, 3, 3, 2, 16, torch.float64)
    args = [inputs[n] for n in NAMES]
    device = torch.device("cpu")
    kw = dict(zip(NAMES, args), key_padding_mask=None, causal=True, dropout_p=0.0,
              training=True)
    assert backends.choose("prefix_attention", "auto", device, **kw) == "torch"
    with pytest.raises(ValueError, match="triton"):
        prefix_attention(*args, backend="triton")  # float64 is torch only
    with pytest.raises(ValueError, match="cuda"):
        prefix_attention(*args, backend="cuda")
    lora_kernels.set_backend("torch")
    assert prefix_attention(*args).dtype == torch.float64
    if HAS_TRITON:
        a32 = [x.float() for x in args]
        with pytest.raises(ValueError, match="dropout"):
            prefix_attention(*a32, dropout_p=0.1, backend="triton")
        prefix_attention(*a32, dropout_p=0.1, training=False, backend="triton")


# ---- bad input: a clear error before any kernel runs -------------------------------------


def _good():
    return dict(q=torch.randn(2, 4, 3, 8), k=torch.randn(2, 2, 5, 8), v=torch.randn(2, 2, 5, 8),
                prefix_k=torch.randn(2, 4, 8), prefix_v=torch.randn(2, 4, 8),
                key_padding_mask=torch.ones(2, 5, dtype=torch.bool))


BAD = {
    "q not a tensor": (dict(q=[[1.0]]), TypeError, "q: expected a torch.Tensor"),
    "q rank": (dict(q=torch.randn(2, 4, 3)), ValueError, "q: expected a 4-D"),
    "k rank": (dict(k=torch.randn(2, 5, 8)), ValueError, "k: expected a 4-D"),
    "integer q": (dict(q=torch.ones(2, 4, 3, 8, dtype=torch.int64)), TypeError, "q: expected dtype"),
    "mixed dtypes": (dict(k=torch.randn(2, 2, 5, 8, dtype=torch.float16),
                          v=torch.randn(2, 2, 5, 8, dtype=torch.float16)), TypeError, "one dtype"),
    "prefix dtype": (dict(prefix_k=torch.randn(2, 4, 8).double(),
                          prefix_v=torch.randn(2, 4, 8).double()), TypeError, "one dtype"),
    "k v shapes": (dict(v=torch.randn(2, 2, 6, 8)), ValueError, "k, v: expected equal shapes"),
    "batch": (dict(k=torch.randn(3, 2, 5, 8), v=torch.randn(3, 2, 5, 8)), ValueError, "batch size"),
    "head dim": (dict(k=torch.randn(2, 2, 5, 4), v=torch.randn(2, 2, 5, 4)), ValueError, "head dim"),
    "Hq % Hkv": (dict(k=torch.randn(2, 3, 5, 8), v=torch.randn(2, 3, 5, 8)), ValueError, "multiple"),
    "head dim 0": (dict(q=torch.randn(2, 4, 3, 0), k=torch.randn(2, 2, 5, 0), v=torch.randn(2, 2, 5, 0),
                        prefix_k=None, prefix_v=None), ValueError, "head dim D >= 1"),
    "Lq > Lk": (dict(q=torch.randn(2, 4, 6, 8)), ValueError, "Lq <= Lk"),
    "prefix_v missing": (dict(prefix_v=None), ValueError, "both or neither"),
    "prefix rank": (dict(prefix_k=torch.randn(8), prefix_v=torch.randn(8)), ValueError, "prefix_k: expected a 3-D or 4-D"),
    "prefix heads": (dict(prefix_k=torch.randn(3, 4, 8), prefix_v=torch.randn(3, 4, 8)), ValueError, "Hkv=2"),
    "prefix head dim": (dict(prefix_k=torch.randn(2, 4, 6), prefix_v=torch.randn(2, 4, 6)), ValueError, "D=8"),
    "prefix k v shapes": (dict(prefix_v=torch.randn(2, 5, 8)), ValueError, "prefix_k, prefix_v: expected equal"),
    "prefix batch": (dict(prefix_k=torch.randn(3, 2, 4, 8), prefix_v=torch.randn(3, 2, 4, 8)), ValueError, "batch of 1 or 2"),
    "mask dtype": (dict(key_padding_mask=torch.ones(2, 5)), TypeError, "key_padding_mask: expected dtype"),
    "mask shape": (dict(key_padding_mask=torch.ones(2, 6, dtype=torch.bool)), ValueError, "(B, Lk)"),
    "mask rank": (dict(key_padding_mask=torch.ones(2, 1, 5, dtype=torch.bool)), ValueError, "key_padding_mask: expected a 2-D"),
    "device": (dict(key_padding_mask=torch.ones(2, 5, dtype=torch.bool, device="meta")), ValueError, "one device"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input(case, monkeypatch):
    change, error, message = BAD[case]
    called = []
    monkeypatch.setattr(backends, "load", lambda op, name: called.append(name))
    monkeypatch.setattr(op_module._sdpa, "attention", lambda *a: called.append("sdpa"))
    args = {**_good(), **change}
    with pytest.raises(error, match=__import__("re").escape(message)):
        prefix_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("prefix_k"),
                         args.pop("prefix_v"), **args)
    assert not called


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(causal=1), TypeError, "causal: expected a bool"),
    (dict(scale="0.5"), TypeError, "scale: expected a float"),
    (dict(dropout_p=1.0), ValueError, "0 <= dropout_p < 1"),
    (dict(dropout_p=None), TypeError, "dropout_p: expected a float"),
    (dict(backend="gpu"), ValueError, "unknown backend"),
])
def test_bad_options(kwargs, error, message):
    g = _good()
    with pytest.raises(error, match=__import__("re").escape(message)):
        prefix_attention(g["q"], g["k"], g["v"], **kwargs)
