"""Plain PyTorch/NumPy references for the CUDA backend's tests (tests/test_cuda_gpu.py on a GPU,
tests/test_cuda_emulated.py in the CPU emulator): attention with a prefix, the LoRA linear, and
the dropout mask the kernels draw (Philox4x32-10, as documented in csrc/device/philox.cuh)."""

from __future__ import annotations

import numpy as np
import torch
from helpers import assert_close_to_reference


def attention_torch(q, k, v, pk, pv, kpm, causal, scale):
    """Reference in the inputs' dtype: concatenated keys, explicit mask, safe softmax (a row that
    sees no key gives 0), GQA by repeat_interleave. q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D),
    pk/pv (1 or B, Hkv, P, D), kpm (B, Lk) bool or None. Returns (out, lse)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    P = pk.shape[2]
    keep = torch.ones(B, 1, Lq, Lk, dtype=torch.bool, device=q.device)
    if causal:
        keep = keep & torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(Lk - Lq)
    if kpm is not None:
        keep = keep & kpm[:, None, None, :]
    keys = torch.cat([pk.expand(B, -1, -1, -1), k], 2)
    vals = torch.cat([pv.expand(B, -1, -1, -1), v], 2)
    keep = torch.cat([keep.new_ones(B, 1, Lq, P), keep], -1)
    rep = Hq // Hkv
    keys, vals = keys.repeat_interleave(rep, 1), vals.repeat_interleave(rep, 1)
    s = (q @ keys.transpose(-1, -2)) * scale
    s = s.masked_fill(~keep, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m) * keep
    denom = e.sum(-1, keepdim=True)
    out = (e / denom.clamp_min(torch.finfo(denom.dtype).tiny)) @ vals
    lse = (m + denom.log()).squeeze(-1)
    return out, lse


def attention_inputs(B, Hq, Hkv, Lq, Lk, P, D, bp, dtype, padded, device="cpu"):
    """Random inputs; with `padded`, batch row 0 has every sequence key padded out."""
    kw = dict(device=device)
    q = torch.randn(B, Hq, Lq, D, **kw).to(dtype)
    k = torch.randn(B, Hkv, Lk, D, **kw).to(dtype)
    v = torch.randn(B, Hkv, Lk, D, **kw).to(dtype)
    pk = torch.randn(bp, Hkv, P, D, **kw).to(dtype)
    pv = torch.randn(bp, Hkv, P, D, **kw).to(dtype)
    kpm = None
    if padded:
        kpm = torch.rand(B, Lk, **kw) > 0.3
        kpm[0] = False
        if B > 1:
            kpm[1] = True
    return q, k, v, pk, pv, kpm


def check_attention_forward_backward(ca, q, k, v, pk, pv, kpm, causal, lse_atol):
    """The CUDA backend module ``ca`` (forward, backward) against the float64 reference with the
    tolerance rule of helpers.py: out, LSE (rows that see no key: -inf and zeros), every grad."""
    scale = q.shape[-1] ** -0.5
    out, lse = ca.forward(q, k, v, pk, pv, kpm, causal, scale)
    leaves64 = [t.double().requires_grad_() for t in (q, k, v, pk, pv)]
    out64, lse64 = attention_torch(*leaves64, kpm, causal, scale)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, pk, pv)]
    outb, _ = attention_torch(*leaves, kpm, causal, scale)
    assert_close_to_reference(out, out64.detach(), outb.detach(), "out")
    lse64 = lse64.detach()
    dead = torch.isinf(lse64)  # rows that see no key
    assert torch.equal(torch.isinf(lse), dead) and bool((lse[dead] < 0).all())
    assert bool((out[dead.unsqueeze(-1).expand_as(out)] == 0).all())
    if (~dead).any():
        torch.testing.assert_close(lse[~dead].double(), lse64[~dead], rtol=0, atol=lse_atol)

    dout = torch.randn_like(out)
    grads = ca.backward(dout, q, k, v, pk, pv, kpm, out, lse, causal, scale)
    out64.backward(dout.double())
    outb.backward(dout)
    for name, g, ref, base in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, leaves64,
                                  leaves):
        assert g.shape == base.shape and g.dtype == base.dtype, name
        assert_close_to_reference(g, ref.grad, base.grad, name)
    return out, lse


def lora_torch(x, w, b, a, bb, scaling, mask, p):
    """Plain PyTorch LoRA linear in the inputs' dtypes (PEFT's way: x cast to the adapter dtype);
    mask (T, in) 0/1 or None."""
    xd = x if mask is None else x * mask.to(x.dtype) / (1 - p)
    y = torch.nn.functional.linear(x, w, b)
    return y + (scaling * ((xd.to(a.dtype) @ a.t()) @ bb.t())).to(y.dtype)


_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = np.uint32(0x9E3779B9), np.uint32(0xBB67AE85)


def philox4x32_10(seed: int, c0, c1, c2, c3):
    """Philox4x32-10 of counters (uint32 arrays) under key `seed` (64 bits): four uint32 arrays."""
    c = [np.asarray(x, dtype=np.uint32).copy() for x in (c0, c1, c2, c3)]
    k0, k1 = np.uint32(seed & 0xFFFFFFFF), np.uint32((seed >> 32) & 0xFFFFFFFF)
    mask32 = np.uint64(0xFFFFFFFF)
    for _ in range(10):
        p0 = c[0].astype(np.uint64) * _M0
        p1 = c[2].astype(np.uint64) * _M1
        hi0, lo0 = (p0 >> np.uint64(32)).astype(np.uint32), (p0 & mask32).astype(np.uint32)
        hi1, lo1 = (p1 >> np.uint64(32)).astype(np.uint32), (p1 & mask32).astype(np.uint32)
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
        k0 = np.uint32((int(k0) + int(_W0)) & 0xFFFFFFFF)
        k1 = np.uint32((int(k1) + int(_W1)) & 0xFFFFFFFF)
    return c


def dropout_keep_mask(T: int, n_in: int, p: float, seed: int) -> torch.Tensor:
    """The kernels' keep mask (T, in) as float64 0/1: element (t, i) is kept iff word i % 4 of
    Philox4x32-10 with counter (i // 4, t, 0, 0) and key seed is >= round(p 2^32)."""
    t = np.repeat(np.arange(T, dtype=np.uint64), (n_in + 3) // 4)
    g = np.tile(np.arange((n_in + 3) // 4, dtype=np.uint64), T)
    words = philox4x32_10(seed, g, t & np.uint64(0xFFFFFFFF), t >> np.uint64(32), np.zeros_like(g))
    threshold = min(int(p * 2.0**32 + 0.5), 0xFFFFFFFF)
    keep = np.stack([w >= threshold for w in words], axis=1).reshape(T, -1)[:, :n_in]
    return torch.from_numpy(keep.astype(np.float64))
