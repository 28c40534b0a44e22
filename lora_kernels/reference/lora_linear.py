"""lora_linear in plain PyTorch: the fallback backend everywhere and the oracle of the tests.

``y = x W^T + b + scaling * dropout(x) A^T B^T``, forward and a hand-written backward.

Memory, the point of this backend on the CPU: the forward writes the base output once
(``addmm``) and adds the LoRA term into it in place (``addmm_``), so no separate (T, out) LoRA
tensor exists; it keeps only ``s = dropout(x) A^T`` (T, r) besides ``x``. The dropout mask is
never stored: it is drawn from a ``torch.Generator`` seeded from ``(seed, chunk)`` over row
chunks of ``x``, so the backward regenerates exactly the same mask, chunk by chunk, with at most
one chunk of mask and dropped input alive at a time.

Backend contract (shared with the triton and cuda backends): ``forward``, ``backward``,
``not_supported_reasons``; ``lora_linear_formula`` is the plain-autograd formula for tests.
"""

from __future__ import annotations

import torch

# Elements of x per dropout chunk: the mask of a chunk lives only while it is used.
CHUNK_ELEMENTS = 1 << 18
_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio odd constant: spreads (seed, chunk) over 64 bits
_MASK64 = (1 << 64) - 1


def s_dtype(adapter_dtype: torch.dtype) -> torch.dtype:
    """Dtype of the saved ``s``: float32, or float64 for float64 adapters."""
    return torch.promote_types(adapter_dtype, torch.float32)


def rows_per_chunk(in_features: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, in_features))


def _chunk_generator(seed: int, chunk: int, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    mixed = ((int(seed) * _SEED_MIX) ^ (chunk * 0xBF58476D1CE4E5B9 + 1)) & _MASK64
    gen.manual_seed(mixed & ((1 << 63) - 1))
    return gen


def keep_mask(x_rows: torch.Tensor, dropout_p: float, seed: int, chunk: int) -> torch.Tensor:
    """Bool keep-mask of one row chunk (True = kept): a pure function of (seed, chunk, shape)."""
    gen = _chunk_generator(seed, chunk, x_rows.device)
    u = torch.rand(x_rows.shape, generator=gen, device=x_rows.device, dtype=torch.float32)
    return u >= dropout_p


def _chunks(x: torch.Tensor):
    step = rows_per_chunk(x.shape[1])
    for chunk, start in enumerate(range(0, x.shape[0], step)):
        yield chunk, start, min(start + step, x.shape[0])


def _dropped(x_rows, dtype, dropout_p, seed, chunk):
    """dropout(x_rows) in ``dtype``: kept values scaled by 1/(1-p)."""
    xr = x_rows.to(dtype)
    if dropout_p == 0.0:
        return xr
    keep = keep_mask(x_rows, dropout_p, seed, chunk)
    return xr.mul(keep).mul_(1.0 / (1.0 - dropout_p))


def shrink(x: torch.Tensor, lora_A: torch.Tensor, dropout_p: float, seed: int) -> torch.Tensor:
    """``s = dropout(x) A^T`` (T, r) in :func:`s_dtype`, computed in the adapter dtype."""
    adt = lora_A.dtype
    if dropout_p == 0.0 and x.dtype == adt:
        return torch.mm(x, lora_A.t()).to(s_dtype(adt))
    s = torch.empty(x.shape[0], lora_A.shape[0], device=x.device, dtype=adt)
    for chunk, a, b in _chunks(x):
        torch.mm(_dropped(x[a:b], adt, dropout_p, seed, chunk), lora_A.t(), out=s[a:b])
    return s.to(s_dtype(adt))


def forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    """x (T, in); weight (out, in) any strides, x's dtype; bias (out,) or None; lora_A (r, in),
    lora_B (out, r) in the adapter dtype -> (y (T, out) in x's dtype, s (T, r) float32)."""
    s = shrink(x, lora_A, dropout_p, seed)
    if bias is None:
        y = torch.mm(x, weight.t())
    else:
        y = torch.addmm(bias.to(x.dtype), x, weight.t())
    if lora_B.dtype == x.dtype:
        y.addmm_(s.to(x.dtype), lora_B.t(), alpha=scaling)
    else:  # adapters in another dtype (fp32 over bf16): LoRA term in the adapter dtype, as PEFT
        y.add_(torch.mm(s.to(lora_B.dtype), lora_B.t()), alpha=scaling)
    return y, s


def backward(dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed, needs):
    """Gradients ``(dx, dweight, dbias, dA, dB)`` for ``needs`` = which of (x, weight, bias,
    lora_A, lora_B) need one (None where not). dweight (out, in) as ``weight`` was passed."""
    need_x, need_w, need_b, need_a, need_bb = needs
    adt = lora_A.dtype
    dy_a = dy if dy.dtype == adt else dy.to(adt)
    ds = torch.mm(dy_a, lora_B).mul_(scaling) if (need_x or need_a) else None  # (T, r)
    dB = torch.mm(dy_a.t(), s.to(adt)).mul_(scaling) if need_bb else None
    del dy_a
    dx = dA = None
    if need_x:
        dx = torch.mm(dy, weight.to(dy.dtype))
    if need_a:
        dA = torch.zeros_like(lora_A)
    if need_x or need_a:
        if dropout_p == 0.0 and x.dtype == adt:
            if need_x:
                dx.addmm_(ds.to(dx.dtype), lora_A)
            if need_a:
                torch.mm(ds.t(), x, out=dA)
        else:
            for chunk, a, b in _chunks(x):
                if need_a:
                    dA.addmm_(ds[a:b].t(), _dropped(x[a:b], adt, dropout_p, seed, chunk))
                if need_x:
                    g = torch.mm(ds[a:b], lora_A)  # (rows, in) in the adapter dtype
                    if dropout_p:
                        g.mul_(keep_mask(x[a:b], dropout_p, seed, chunk)).mul_(1.0 / (1.0 - dropout_p))
                    dx[a:b].add_(g)
    dw = torch.mm(dy.t(), x) if need_w else None
    db = dy.sum(0) if need_b else None
    return dx, dw, db, dA, dB


def not_supported_reasons(x, weight, bias, lora_A, lora_B, dropout_p, training) -> list[str]:
    """The torch backend serves every input the op accepts."""
    return []


def lora_linear_formula(x, weight, bias, lora_A, lora_B, scaling, keep=None, dropout_p=0.0):
    """The plain formula through autograd (tests run it in float64). ``keep``: bool mask of x's
    shape (True = kept) or None for no dropout."""
    xd = x if keep is None else x * keep / (1.0 - dropout_p)
    y = x @ weight.t() + scaling * (xd @ lora_A.t()) @ lora_B.t()
    return y if bias is None else y + bias
