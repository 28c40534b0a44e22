"""The CUDA backend on a GPU: every output and gradient of both operators against a float64
reference, at shapes that cross many blocks and at realistic bf16 sizes, directly through the
backend modules and through the public ops with backend="cuda"; the dropout mask is the
documented Philox mask in forward and backward; gradients are bitwise deterministic. Skipped
without a GPU (and without the extension). tests/test_cuda_emulated.py runs the same kernels in
a CPU emulator."""

from __future__ import annotations

import math

import pytest
import torch
from cuda_reference import attention_inputs as _attention_inputs
from cuda_reference import (
    attention_torch,
    check_attention_forward_backward,
    dropout_keep_mask,
    lora_torch,
)
from helpers import assert_close_to_reference

pytestmark = [pytest.mark.gpu, pytest.mark.cuda_ext]

DEV = "cuda"


@pytest.fixture(scope="module")
def lib():
    from lora_kernels.cuda import ops

    return ops()


# ================================ lora_linear ==================================================


def dropout_mask(lib, T: int, n_in: int, p: float, seed: int) -> torch.Tensor:
    """The kernels' keep mask (T, in) as float64 0/1, read through lora_grad_x_a:
    dx = mask * (ones(T, 1) @ ones(1, in)) / (1 - p)."""
    dx, _ = lib.lora_grad_x_a(torch.ones(T, 1, device=DEV), torch.zeros(T, n_in, device=DEV),
                              torch.ones(1, n_in, device=DEV), p, seed, True, False)
    return (dx.double() * (1 - p)).round()


def lora_inputs(T, n_in, n_out, r, dtype, adapter_dtype, bias, layout="contiguous"):
    x = torch.randn(T, n_in, device=DEV).to(dtype)
    w = (torch.randn(n_out, n_in, device=DEV) / math.sqrt(n_in)).to(dtype)
    if layout == "transposed":  # any strides: x and weight as transposed views
        x = x.t().contiguous().t()
        w = w.t().contiguous().t()
    b = torch.randn(n_out, device=DEV).to(dtype) if bias else None
    a = (torch.randn(r, n_in, device=DEV) / math.sqrt(n_in)).to(adapter_dtype)
    bb = torch.randn(n_out, r, device=DEV).to(adapter_dtype)
    return x, w, b, a, bb


def check_lora_backend(lib, T, n_in, n_out, r, dtype, adapter_dtype, p, bias, layout="contiguous"):
    from lora_kernels.cuda import lora_linear as cl

    scaling, seed = 1.7, 20240611 + T
    x, w, b, a, bb = lora_inputs(T, n_in, n_out, r, dtype, adapter_dtype, bias, layout)
    assert not cl.not_supported_reasons(x, w, b, a, bb, p, True)
    mask = dropout_mask(lib, T, n_in, p, seed) if p > 0 else None

    y, s = cl.forward(x, w, b, a, bb, scaling, p, seed)
    assert y.dtype == dtype and y.shape == (T, n_out)
    assert s.dtype == torch.float32 and s.shape == (T, r)

    leaves64 = [t.double().requires_grad_() if t is not None else None for t in (x, w, b, a, bb)]
    y64 = lora_torch(*leaves64[:5], scaling, mask, p)
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b, a, bb)]
    ybase = lora_torch(*leaves, scaling, mask, p)
    assert_close_to_reference(y, y64.detach(), ybase.detach(), "y")
    x64 = leaves64[0].detach()
    s64 = (x64 if mask is None else x64 * mask / (1 - p)) @ leaves64[3].detach().t()
    xd = x if mask is None else x * mask.to(dtype) / (1 - p)
    s_base = (xd.to(adapter_dtype) @ a.t()).float()  # the torch path in the adapter dtype
    assert_close_to_reference(s, s64, s_base, "s", floor_eps=32)

    dy = torch.randn(T, n_out, device=DEV).to(dtype)
    needs = (True, True, bias, True, True)
    grads = cl.backward(dy, x, w, a, bb, s, scaling, p, seed, needs)
    y64.backward(dy.double())
    ybase.backward(dy)
    names = ("dx", "dweight", "dbias", "dA", "dB")
    for name, g, ref, base in zip(names, grads, leaves64, leaves):
        if ref is None:
            assert g is None, name
            continue
        assert g.dtype == base.dtype and g.shape == base.shape, name
        assert_close_to_reference(g, ref.grad, base.grad, name)
    # Only what is asked for.
    none = cl.backward(dy, x, w, a, bb, s, scaling, p, seed, (False,) * 5)
    assert none == (None,) * 5


@pytest.mark.parametrize("shape", [(1, 5, 7, 1), (97, 123, 61, 4), (1031, 517, 259, 16),
                                   (300, 64, 128, 64), (64, 256, 96, 96)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("adapter", ["same", "float32"])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_lora_backend_matches_float64(lib, shape, dtype, adapter, p, bias):
    adapter_dtype = dtype if adapter == "same" else torch.float32
    check_lora_backend(lib, *shape, dtype, adapter_dtype, p, bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_backend_any_strides(lib, dtype):
    check_lora_backend(lib, 77, 130, 90, 8, dtype, torch.float32, 0.2, True, layout="transposed")


@pytest.mark.parametrize("adapter_dtype", [torch.bfloat16, torch.float32])
def test_lora_backend_bf16_realistic(lib, adapter_dtype):
    check_lora_backend(lib, 4096, 4096, 4096, 16, torch.bfloat16, adapter_dtype, 0.1, False)


def test_dropout_mask_same_in_forward_and_backward(lib):
    T, n_in, p, seed = 53, 37, 0.25, 777
    from_dx = dropout_mask(lib, T, n_in, p, seed)
    # The documented mask: Philox4x32-10 with counter (i // 4, t, 0, 0), word i % 4.
    torch.testing.assert_close(from_dx.cpu(), dropout_keep_mask(T, n_in, p, seed), rtol=0, atol=0)
    # Forward: shrink with x = 1 and A = I gives S = mask / (1 - p).
    s = lib.lora_shrink(torch.ones(T, n_in, device=DEV), torch.eye(n_in, device=DEV), p, seed)
    torch.testing.assert_close((s.double() * (1 - p)).round(), from_dx, rtol=0, atol=0)
    # dA with dS = 1 and x = 1: column sums of the mask / (1 - p), with the mask drawn by the dA
    # kernel itself (need_dx False) and handed over packed by the dx kernel (both needed).
    for need_dx in (False, True):
        _, da = lib.lora_grad_x_a(torch.ones(T, 1, device=DEV), torch.ones(T, n_in, device=DEV),
                                  torch.ones(1, n_in, device=DEV), p, seed, need_dx, True)
        torch.testing.assert_close(da[0].double() * (1 - p), from_dx.sum(0), rtol=1e-5, atol=1e-3)
    # Half-precision x: same mask.
    s16 = lib.lora_shrink(torch.ones(T, n_in, device=DEV, dtype=torch.bfloat16),
                          torch.eye(n_in, device=DEV, dtype=torch.bfloat16), p, seed)
    torch.testing.assert_close((s16.double() * (1 - p)).round(), from_dx, rtol=0, atol=0)
    # A pure function of (seed, index): repeatable, and another seed gives another mask.
    torch.testing.assert_close(dropout_mask(lib, T, n_in, p, seed), from_dx, rtol=0, atol=0)
    assert not torch.equal(dropout_mask(lib, T, n_in, p, seed + 1), from_dx)


def test_lora_gradients_deterministic_and_mask_handover(lib):
    """dS, dB, dA and dx are reduced in a fixed order (no atomics): bitwise equal run to run;
    dA is the same whether the dx kernel hands the mask over or the dA kernel draws it."""
    from lora_kernels.cuda import lora_linear as cl

    x, w, _, a, bb = lora_inputs(2048, 1024, 768, 16, torch.bfloat16, torch.float32, False)
    y, s = cl.forward(x, w, None, a, bb, 2.0, 0.1, 11)
    dy = torch.randn_like(y)
    needs = (True, False, False, True, True)
    first = cl.backward(dy, x, w, a, bb, s, 2.0, 0.1, 11, needs)
    second = cl.backward(dy, x, w, a, bb, s, 2.0, 0.1, 11, needs)
    for name, g1, g2 in zip(("dx", "dweight", "dbias", "dA", "dB"), first, second):
        assert (g1 is None) == (g2 is None), name
        if g1 is not None:
            assert torch.equal(g1, g2), name
    d_a_alone = cl.backward(dy, x, w, a, bb, s, 2.0, 0.1, 11, (False, False, False, True, False))[3]
    assert torch.equal(d_a_alone, first[3])
    y2, s2 = cl.forward(x, w, None, a, bb, 2.0, 0.1, 11)
    assert torch.equal(y, y2) and torch.equal(s, s2)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keep_rate(lib, p):
    mask = dropout_mask(lib, 1024, 1024, p, 99)
    assert abs(mask.mean().item() - (1 - p)) < 0.005  # 1M draws: 5 sigma is about 0.0025


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_lora_public_op_with_cuda_backend(lib, dtype, fan_in_fan_out, monkeypatch):
    import lora_kernels.ops as ops
    from lora_kernels.cuda import lora_linear as cl

    calls = []
    real_forward = cl.forward
    monkeypatch.setattr(cl, "forward", lambda *a: calls.append(1) or real_forward(*a))
    x, w, b, a, bb = lora_inputs(3 * 67, 96, 80, 8, dtype, torch.float32, True)
    x = x.reshape(3, 67, 96)
    w_arg = w.t().contiguous() if fan_in_fan_out else w
    leaves = [t.detach().clone().requires_grad_() for t in (x, w_arg, b, a, bb)]
    y = ops.lora_linear(*leaves, 2.0, 0.0, training=True, fan_in_fan_out=fan_in_fan_out,
                        seed=5, backend="cuda")
    assert calls, "backend='cuda' did not reach lora_kernels.cuda.lora_linear.forward"
    leaves64 = [t.detach().double().requires_grad_() for t in (x, w_arg, b, a, bb)]
    w64 = leaves64[1].t() if fan_in_fan_out else leaves64[1]
    y64 = lora_torch(leaves64[0], w64, leaves64[2], leaves64[3], leaves64[4], 2.0, None, 0.0)
    base_leaves = [t.detach().clone().requires_grad_() for t in (x, w_arg, b, a, bb)]
    wb = base_leaves[1].t() if fan_in_fan_out else base_leaves[1]
    ybase = lora_torch(base_leaves[0], wb, *base_leaves[2:], 2.0, None, 0.0)
    assert_close_to_reference(y, y64.detach(), ybase.detach(), "y")
    dy = torch.randn_like(y)
    y.backward(dy)
    y64.backward(dy.double())
    ybase.backward(dy)
    for name, t, r, bs in zip(("x", "weight", "bias", "lora_A", "lora_B"), leaves, leaves64,
                              base_leaves):
        assert_close_to_reference(t.grad, r.grad, bs.grad, f"d{name}")


# ================================ prefix_attention =============================================


def attention_inputs(B, Hq, Hkv, Lq, Lk, P, D, bp, dtype, padded):
    return _attention_inputs(B, Hq, Hkv, Lq, Lk, P, D, bp, dtype, padded, device=DEV)


def check_attention_backend(B, Hq, Hkv, Lq, Lk, P, D, bp, dtype, causal, padded):
    from lora_kernels.cuda import prefix_attention as ca

    q, k, v, pk, pv, kpm = attention_inputs(B, Hq, Hkv, Lq, Lk, P, D, bp, dtype, padded)
    assert not ca.not_supported_reasons(q, k, v, pk, pv, kpm, causal, 0.0, True)
    out, lse = check_attention_forward_backward(ca, q, k, v, pk, pv, kpm, causal, lse_atol=2e-2)
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (B, Hq, Lq) and lse.dtype == torch.float32


ATTN_SHAPES = [  # (B, Hq, Hkv, Lq, Lk, P)
    (1, 1, 1, 1, 1, 0),
    (2, 4, 2, 97, 123, 5),
    (2, 2, 1, 130, 70, 0),     # Lq > Lk: causal rows that see no key
    (3, 8, 2, 64, 64, 16),
    (1, 2, 2, 200, 333, 70),   # prefix crossing a 64-key tile
    (2, 3, 3, 1, 257, 3),      # decoding: one query over a long cache
]


@pytest.mark.parametrize("shape", ATTN_SHAPES)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("shared_prefix", [True, False])
def test_attention_backend_matches_float64(shape, D, dtype, causal, padded, shared_prefix):
    B = shape[0]
    check_attention_backend(*shape, D, 1 if shared_prefix else B, dtype, causal, padded)


def test_attention_backend_bf16_realistic():
    check_attention_backend(2, 32, 8, 1024, 1024, 32, 128, 1, torch.bfloat16, True, False)


@pytest.mark.parametrize("Lq", [1, 5, 16])
@pytest.mark.parametrize("shared_prefix", [True, False])
def test_attention_backend_decode_gqa(Lq, shared_prefix):
    """Decoding: a few queries over a long cache, grouped-query heads, padding, a prefix."""
    B = 3
    check_attention_backend(B, 16, 4, Lq, 1000, 32, 128, 1 if shared_prefix else B,
                            torch.bfloat16, True, True)


@pytest.mark.parametrize("D", [64, 128])
def test_attention_backward_deterministic(D):
    """No atomics: the backward, including a prefix shared by a batch of 8 (its gradient summed
    over batch chunks in a fixed order), is bitwise equal run to run."""
    from lora_kernels.cuda import prefix_attention as ca

    q, k, v, pk, pv, kpm = attention_inputs(8, 8, 2, 300, 300, 40, D, 1, torch.bfloat16, True)
    out, lse = ca.forward(q, k, v, pk, pv, kpm, True, D ** -0.5)
    out2, lse2 = ca.forward(q, k, v, pk, pv, kpm, True, D ** -0.5)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)
    dout = torch.randn_like(out)
    first = ca.backward(dout, q, k, v, pk, pv, kpm, out, lse, True, D ** -0.5)
    second = ca.backward(dout, q, k, v, pk, pv, kpm, out, lse, True, D ** -0.5)
    for name, g1, g2 in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), first, second):
        assert torch.equal(g1, g2), name


@pytest.mark.parametrize("layout", ["packed_qkv", "misaligned"])
def test_attention_backend_any_strides(layout):
    """Views straight out of a packed QKV projection (16-byte aligned rows: vector loads) and
    views shifted by one element (scalar loads); forward and every gradient."""
    from lora_kernels.cuda import prefix_attention as ca

    B, H, L, D, P = 2, 4, 75, 64, 9
    kw = dict(device=DEV, dtype=torch.float16)
    if layout == "packed_qkv":
        base = torch.randn(B, L, 3, H, D, **kw)  # (B, L, 3, H, D) -> three (B, H, L, D) views
        q, k, v = (base[:, :, i].transpose(1, 2) for i in range(3))
        pk = torch.randn(H, P, D, **kw).unsqueeze(0)
        pv = torch.randn(P, H, D, **kw).transpose(0, 1).unsqueeze(0)
    else:
        wide = torch.randn(5, B, H, L, D + 1, **kw)
        q, k, v = wide[0, ..., 1:], wide[1, ..., 1:], wide[2, ..., :D]
        pk, pv = wide[3, :1, :, :P, 1:], wide[4, :1, :, :P, 1:]
    scale = D ** -0.5
    out, lse = ca.forward(q, k, v, pk, pv, None, True, scale)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v, pk, pv)]
    ref, _ = attention_torch(*leaves64, None, True, scale)
    base_leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, pk, pv)]
    base_out, _ = attention_torch(*base_leaves, None, True, scale)
    assert_close_to_reference(out, ref.detach(), base_out.detach(), "out")
    dout = torch.randn(B, L, H, D, **kw).transpose(1, 2)  # non-contiguous dout too
    grads = ca.backward(dout, q, k, v, pk, pv, None, out, lse, True, scale)
    ref.backward(dout.double())
    base_out.backward(dout)
    for name, g, r, bs in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, leaves64,
                              base_leaves):
        assert_close_to_reference(g, r.grad, bs.grad, name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shared_prefix", [True, False])
def test_attention_public_op_with_cuda_backend(dtype, shared_prefix, monkeypatch):
    import lora_kernels.ops as ops
    from lora_kernels.cuda import prefix_attention as ca

    calls = []
    real_forward = ca.forward
    monkeypatch.setattr(ca, "forward", lambda *a: calls.append(1) or real_forward(*a))
    B, Hq, Hkv, Lq, Lk, P, D = 2, 8, 2, 77, 77, 11, 128
    q, k, v, pk, pv, kpm = attention_inputs(B, Hq, Hkv, Lq, Lk, P, D, 1 if shared_prefix else B,
                                            dtype, True)
    if shared_prefix:
        pk, pv = pk[0], pv[0]  # (Hkv, P, D), shared by the batch
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, pk, pv)]
    out = ops.prefix_attention(*leaves, causal=True, key_padding_mask=kpm, backend="cuda")
    assert calls, "backend='cuda' did not reach lora_kernels.cuda.prefix_attention.forward"
    as4 = (lambda t: t.unsqueeze(0)) if shared_prefix else (lambda t: t)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v, pk, pv)]
    out64, _ = attention_torch(*leaves64[:3], as4(leaves64[3]), as4(leaves64[4]), kpm, True,
                               D ** -0.5)
    base = [t.detach().clone().requires_grad_() for t in (q, k, v, pk, pv)]
    outb, _ = attention_torch(*base[:3], as4(base[3]), as4(base[4]), kpm, True, D ** -0.5)
    assert_close_to_reference(out, out64.detach(), outb.detach(), "out")
    dout = torch.randn_like(out)
    out.backward(dout)
    out64.backward(dout.double())
    outb.backward(dout)
    for name, t, r, bs in zip(("q", "k", "v", "prefix_k", "prefix_v"), leaves, leaves64, base):
        assert_close_to_reference(t.grad, r.grad, bs.grad, f"d{name}")


# ================================ registration on the GPU ======================================


def test_opcheck_every_op(lib):
    """Schema (mutation annotations), fake implementations and dispatch of every op agree with
    what the CUDA kernels do."""
    x = torch.randn(37, 50, device=DEV, dtype=torch.bfloat16)
    a = torch.randn(6, 50, device=DEV)
    b = torch.randn(29, 6, device=DEV)
    y = torch.randn(37, 29, device=DEV, dtype=torch.bfloat16)
    bias = torch.randn(29, device=DEV, dtype=torch.bfloat16)
    s = lib.lora_shrink(x, a, 0.2, 7)
    torch.library.opcheck(lib.lora_shrink.default, (x, a, 0.2, 7))
    torch.library.opcheck(lib.lora_expand.default, (s, b, bias, 1.5, torch.bfloat16))
    torch.library.opcheck(lib.lora_expand.default, (s, b, None, 1.5, torch.float32))
    torch.library.opcheck(lib.lora_grad_s_b.default, (y, s, b, 1.5, True))
    torch.library.opcheck(lib.lora_grad_x_a.default, (s, x, a, 0.2, 7, True, True))
    torch.library.opcheck(lib.lora_grad_x_a.default, (s, x, a, 0.2, 7, False, True))
    q, k, v, pk, pv, kpm = attention_inputs(2, 4, 2, 33, 40, 7, 64, 1, torch.float16, True)
    out, lse = lib.prefix_attention_fwd(q, k, v, pk, pv, kpm, True, 0.125)
    torch.library.opcheck(lib.prefix_attention_fwd.default, (q, k, v, pk, pv, kpm, True, 0.125))
    torch.library.opcheck(lib.prefix_attention_bwd.default,
                          (torch.randn_like(out), q, k, v, pk, pv, kpm, out, lse, True, 0.125))


def test_compile_fullgraph_with_cuda_backend(lib):
    import lora_kernels.ops as ops

    x, w, bias, a, bb = lora_inputs(64, 96, 80, 8, torch.bfloat16, torch.float32, True)

    def lora(x, w, bias, a, bb):
        return ops.lora_linear(x, w, bias, a, bb, 2.0, 0.1, seed=3, backend="cuda")

    eager = lora(x, w, bias, a, bb)
    compiled = torch.compile(lora, fullgraph=True)(x, w, bias, a, bb)
    torch.testing.assert_close(compiled, eager)

    q, k, v, pk, pv, kpm = attention_inputs(2, 4, 2, 50, 50, 5, 128, 1, torch.bfloat16, True)

    def attn(q, k, v, pk, pv):
        return ops.prefix_attention(q, k, v, pk[0], pv[0], causal=True, key_padding_mask=kpm,
                                    backend="cuda")

    eager = attn(q, k, v, pk, pv)
    compiled = torch.compile(attn, fullgraph=True)(q, k, v, pk, pv)
    torch.testing.assert_close(compiled, eager)
