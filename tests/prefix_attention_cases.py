"""Shared by the prefix_attention tests: random inputs and the check of a forward/backward
pair against the float64 oracle (the tolerance rule of helpers.py)."""

from __future__ import annotations

import torch
from helpers import assert_close_to_reference

from lora_kernels import prefix_attention
from lora_kernels.reference.prefix_attention import oracle

NAMES = ("q", "k", "v", "prefix_k", "prefix_v")


def run_op(inputs, dout, **kwargs):
    """The public op's forward and backward on fresh leaves: (out, {name: grad or None})."""
    tensors = {n: (None if inputs[n] is None else inputs[n].clone().requires_grad_())
               for n in NAMES}
    out = prefix_attention(tensors["q"], tensors["k"], tensors["v"], tensors["prefix_k"],
                           tensors["prefix_v"], key_padding_mask=inputs["key_padding_mask"],
                           **kwargs)
    out.backward(dout.to(out.dtype))
    return out.detach(), {n: (None if t is None else t.grad) for n, t in tensors.items()}


def check_compiled_matches_eager(inputs, dout, **kwargs):
    """torch.compile(fullgraph=True, aot_eager) of the op, forward and backward, equals eager."""
    eager_out, eager_grads = run_op(inputs, dout, **kwargs)
    fn = torch.compile(lambda q, k, v, pk, pv, m: prefix_attention(
        q, k, v, pk, pv, key_padding_mask=m, **kwargs) * 2.0, fullgraph=True, backend="aot_eager")
    t = {n: inputs[n].clone().requires_grad_() for n in NAMES}
    out = fn(t["q"], t["k"], t["v"], t["prefix_k"], t["prefix_v"], inputs["key_padding_mask"])
    (out / 2.0).backward(dout)
    torch.testing.assert_close(out / 2.0, eager_out)
    for n in NAMES:
        torch.testing.assert_close(t[n].grad, eager_grads[n])


def make_inputs(B, Hq, Hkv, Lq, Lk, P, D, dtype, *, per_row=False, pad=False, shared_3d=False):
    """Random inputs; with ``pad`` row 0 of the key padding mask is fully padded and the
    others keep about 70 % of the keys (at least one)."""
    q = torch.randn(B, Hq, Lq, D, dtype=dtype)
    k = torch.randn(B, Hkv, Lk, D, dtype=dtype)
    v = torch.randn(B, Hkv, Lk, D, dtype=dtype)
    pk = pv = None
    if P > 0:
        shape = (B, Hkv, P, D) if per_row else ((Hkv, P, D) if shared_3d else (1, Hkv, P, D))
        pk, pv = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    mask = None
    if pad:
        mask = torch.rand(B, Lk) > 0.3
        mask[:, -1] = True
        mask[0] = False
    return dict(q=q, k=k, v=v, prefix_k=pk, prefix_v=pv, key_padding_mask=mask)


def oracle_out_and_grads(inputs, causal, scale, dout, dtype):
    """Output and gradients of the oracle with the float tensors cast to ``dtype``."""
    tensors = {n: (None if inputs[n] is None else
                   inputs[n].detach().to(dtype).requires_grad_()) for n in NAMES}
    out = oracle(**tensors, key_padding_mask=inputs["key_padding_mask"], causal=causal,
                 scale=scale)
    present = [n for n in NAMES if tensors[n] is not None]
    grads = torch.autograd.grad(out, [tensors[n] for n in present], dout.to(dtype))
    return out, dict(zip(present, grads))


def check_against_oracle(got_out, got_grads, inputs, causal, scale, dout):
    """``got_out`` and ``got_grads`` (name -> tensor) against the float64 oracle, with the
    same-dtype oracle as the baseline."""
    dtype = inputs["q"].dtype
    ref_out, ref_grads = oracle_out_and_grads(inputs, causal, scale, dout, torch.float64)
    base_out, base_grads = oracle_out_and_grads(inputs, causal, scale, dout, dtype)
    # fp32: the fused kernels reduce the prefix gradient over batch x heads x queries and use
    # FlashAttention's delta = rowsum(dO * O); seen up to ~16 ulps of |ref| above twice the
    # (very accurate) fp32 oracle, hence a floor of 32 ulps instead of 8 there.
    floor_eps = 32.0 if dtype == torch.float32 else 8.0
    assert got_out.dtype == dtype
    assert_close_to_reference(got_out, ref_out, base_out, "out", floor_eps=floor_eps)
    for n, ref in ref_grads.items():
        got = got_grads[n]
        assert got is not None, f"d{n} missing"
        assert got.dtype == dtype, f"d{n}: dtype {got.dtype}"
        assert_close_to_reference(got.reshape(ref.shape), ref, base_grads[n], f"d{n}",
                                  floor_eps=floor_eps)


def run_triton(inputs, causal, scale, dout, device="cpu"):
    """Forward and backward of the Triton backend on ``device``: (out, lse, grads by name)."""
    from lora_kernels.triton import prefix_attention as T

    t = {n: (None if x is None else x.to(device)) for n, x in inputs.items()}
    out, lse = T.forward(t["q"], t["k"], t["v"], t["prefix_k"], t["prefix_v"],
                         t["key_padding_mask"], causal, scale)
    grads = T.backward(dout.to(out.dtype).to(device), t["q"], t["k"], t["v"], t["prefix_k"],
                       t["prefix_v"], t["key_padding_mask"], out, lse, causal, scale)
    return out.cpu(), lse.cpu(), {n: (None if g is None else g.cpu()) for n, g in zip(NAMES, grads)}
