"""lora_linear in plain PyTorch: the torch backend (CPU and CUDA) and the oracle of the tests.

``y = x W^T + b + scaling * dropout(x) A^T B^T``, forward and a hand-written backward, in
dense GEMMs only (``mm``/``addmm``/``addmm_`` with alpha and beta: cuBLAS on CUDA).

Memory: the forward writes the base output once (``addmm``) and adds the LoRA term into it in
place (``addmm_``), so no separate (T, out) LoRA tensor exists; it keeps only
``s = dropout(x) A^T`` (T, r) besides ``x``: nothing of size (T, in). The dropout mask is never
stored: it is drawn from a ``torch.Generator`` seeded from ``(seed, chunk)`` over row chunks of
``x``, so the backward regenerates exactly the same mask, chunk by chunk, with at most one chunk
of mask and dropped input alive at a time. On the CPU a chunk's mask is 16-bit words of one
``random_`` compared in place (cache-sized chunks); on CUDA it is one ``bernoulli_`` launch per
chunk of 4 M elements, written in the adapter dtype (so the mask stream differs by device).

The cost on CUDA is counted in kernels that stream (T, in) data (x, dX, masks, dropout(x)) or
(T, out) data (y, dY), for PEFT's default setting (dropout, fp32 adapters over a bf16 base),
next to PEFT's ``lora.Linear`` (the anchor). This backend's (T, in) temporaries live one chunk
of 4 M elements at a time (L2-sized) and nothing of size (T, in) is saved; PEFT's are whole
tensors and two of them (the dropped copy and the mask) are saved for the backward.

=================  ==========================================  ===================================
passes             this backend                                PEFT
=================  ==========================================  ===================================
forward, x         4: base GEMM; bernoulli_; mask * x; A GEMM  4: base GEMM; fp32 cast; dropout;
                                                               A GEMM
forward, y         3: base GEMM; B GEMM; add into y            5: base GEMM; B GEMM; * scaling;
                                                               + y (fp32); cast back
backward, dY       4: dX GEMM; fp32 cast; dS GEMM; dB GEMM     6: fp32 cast; cast back for the
                                                               base; dX GEMM; * scaling; dS GEMM;
                                                               dB GEMM
backward, x / dX   6: dX GEMM; bernoulli_; dS A GEMM;          6: dX GEMM; dS A GEMM; dropout
                   addcmul_ into dX; mask * x; dA GEMM         backward; cast; dX sum; dA GEMM
=================  ==========================================  ===================================

With adapters in x's dtype and no dropout the LoRA term adds no elementwise pass: forward
x A^T and ``addmm_`` into y (alpha = scaling), backward dY B, dY^T S and ``addmm_`` into dX.

Backend contract (shared with the triton and cuda backends): ``forward``, ``backward``,
``not_supported_reasons``; ``lora_linear_formula`` is the plain-autograd formula for tests.
"""

from __future__ import annotations

import torch

from ..backends import Capabilities

CAPABILITIES = Capabilities()  # every device and dtype

# Elements of x per dropout chunk: the mask of a chunk lives only while it is used. Small on
# the CPU (the chunk stays in cache), large on a GPU (few kernel launches per call).
CHUNK_ELEMENTS = 1 << 18
CUDA_CHUNK_ELEMENTS = 1 << 22
# Tests set this to run the CUDA path on CPU tensors (bernoulli_ masks, mixed-dtype updates).
DEVICE_PATH_ON_CPU = False
_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio odd constant: spreads (seed, chunk) over 64 bits
_MASK64 = (1 << 64) - 1


def s_dtype(adapter_dtype: torch.dtype) -> torch.dtype:
    """Dtype of the saved ``s``: float32, or float64 for float64 adapters."""
    return torch.promote_types(adapter_dtype, torch.float32)


def rows_per_chunk(in_features: int, device: torch.device) -> int:
    elements = CUDA_CHUNK_ELEMENTS if device.type == "cuda" else CHUNK_ELEMENTS
    return max(1, elements // max(1, in_features))


def _chunk_generator(seed: int, chunk: int, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    mixed = ((int(seed) * _SEED_MIX) ^ (chunk * 0xBF58476D1CE4E5B9 + 1)) & _MASK64
    gen.manual_seed(mixed & ((1 << 63) - 1))
    return gen


def _device_path(device: torch.device) -> bool:
    """Off the CPU (or forced by tests): bernoulli_ masks and one-kernel mixed-dtype updates."""
    return device.type != "cpu" or DEVICE_PATH_ON_CPU


class KeepMasks:
    """Keep-masks of successive row chunks of x (T, in), as 0./1. in ``dtype`` (1 = kept),
    drawn into a buffer reused from chunk to chunk. The mask of a chunk is a pure function of
    (seed, chunk, shape) for a given device type and adapter dtype (forward and backward share
    both).

    On CUDA one ``bernoulli_`` launch per chunk. On the CPU 16 random bits per element (four per
    64-bit draw: a quarter of the generator calls of ``torch.rand``), kept when above ``p`` of
    their range, so the drop probability is ``p`` rounded to a multiple of 2^-16; compared as
    float32 in place (a float mask multiplies an order of magnitude faster than a bool one)."""

    def __init__(self, x: torch.Tensor, dropout_p: float, seed: int, dtype: torch.dtype):
        rows = min(rows_per_chunk(x.shape[1], x.device), x.shape[0])
        self.in_features, self.seed, self.device = x.shape[1], seed, x.device
        self.bernoulli = _device_path(x.device)
        self.keep_p = 1.0 - dropout_p
        if self.bernoulli:
            self.out = torch.empty(rows, self.in_features, device=x.device, dtype=dtype)
            return
        self.threshold = float(int(round(dropout_p * 65536)) - 32768)
        self.words = torch.empty((rows * self.in_features + 3) // 4, dtype=torch.int64,
                                 device=x.device)
        self.f32 = torch.empty(rows, self.in_features, device=x.device)
        self.out = self.f32 if dtype == torch.float32 else torch.empty_like(self.f32, dtype=dtype)

    def __call__(self, chunk: int, rows: int) -> torch.Tensor:
        """The (rows, in) mask of one chunk: a view of the buffer, valid until the next call."""
        gen = _chunk_generator(self.seed, chunk, self.device)
        if self.bernoulli:
            return self.out[:rows].bernoulli_(self.keep_p, generator=gen)
        n = rows * self.in_features
        words = self.words[: (n + 3) // 4].random_(-(2**63), 2**63 - 1, generator=gen)
        mask = self.f32[:rows]
        mask.copy_(words.view(torch.int16)[:n].view(rows, self.in_features))
        mask.ge_(self.threshold)
        if self.out is self.f32:
            return mask
        return self.out[:rows].copy_(mask)


def _chunks(x: torch.Tensor):
    step = rows_per_chunk(x.shape[1], x.device)
    for chunk, start in enumerate(range(0, x.shape[0], step)):
        yield chunk, start, min(start + step, x.shape[0])


def shrink(x: torch.Tensor, lora_A: torch.Tensor, dropout_p: float, seed: int) -> torch.Tensor:
    """``s = dropout(x) A^T`` (T, r) in :func:`s_dtype`, computed in the adapter dtype."""
    adt = lora_A.dtype
    if dropout_p == 0.0 and x.dtype == adt:
        return torch.mm(x, lora_A.t()).to(s_dtype(adt))
    s = torch.empty(x.shape[0], lora_A.shape[0], device=x.device, dtype=adt)
    masks = KeepMasks(x, dropout_p, seed, adt) if dropout_p else None
    for chunk, a, b in _chunks(x):
        if dropout_p:
            xr = masks(chunk, b - a).mul_(x[a:b])
        else:
            xr = x[a:b].to(adt)
        torch.mm(xr, lora_A.t(), out=s[a:b])
    if dropout_p:
        s.mul_(1.0 / (1.0 - dropout_p))  # the 1/(1-p) on the (T, r) result, not on x
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
    else:  # adapters in another dtype (fp32 over bf16): LoRA term in the adapter dtype, as PEFT,
        # added row chunk by row chunk so no (T, out) tensor in the adapter dtype exists
        s_a = s.to(lora_B.dtype)
        step = rows_per_chunk(y.shape[1], y.device)
        for a in range(0, y.shape[0], step):
            y[a : a + step].add_(torch.mm(s_a[a : a + step], lora_B.t()), alpha=scaling)
    return y, s


def _grad_s_and_b(dy, lora_B, s_a, scaling, need_s, need_lora_B):
    """``dS = scaling dY B`` (T, r) and ``dB = scaling dY^T S`` (out, r) in the adapter dtype;
    dY is cast to it row chunk by row chunk when the dtypes differ."""
    adt = lora_B.dtype
    if dy.dtype == adt:
        ds = torch.mm(dy, lora_B).mul_(scaling) if need_s else None
        dB = torch.mm(dy.t(), s_a).mul_(scaling) if need_lora_B else None
        return ds, dB
    ds = torch.empty(dy.shape[0], lora_B.shape[1], device=dy.device, dtype=adt) if need_s else None
    dB = torch.zeros_like(lora_B) if need_lora_B else None
    step = rows_per_chunk(dy.shape[1], dy.device)
    for a in range(0, dy.shape[0], step):
        dy_a = dy[a : a + step].to(adt)
        if need_s:
            torch.mm(dy_a, lora_B, out=ds[a : a + step])
        if need_lora_B:
            dB.addmm_(dy_a.t(), s_a[a : a + step], alpha=scaling)
    if need_s:
        ds.mul_(scaling)
    return ds, dB


def backward(dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed, needs):
    """Gradients ``(dx, dweight, dbias, dA, dB)`` for ``needs`` = which of (x, weight, bias,
    lora_A, lora_B) need one (None where not). dweight (out, in) as ``weight`` was passed."""
    need_x, need_weight, need_bias, need_a, need_lora_B = needs
    adt = lora_A.dtype
    ds, dB = _grad_s_and_b(dy, lora_B, s.to(adt), scaling, need_x or need_a, need_lora_B)
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
            if dropout_p:
                ds = ds * (1.0 / (1.0 - dropout_p))  # (T, r): cheaper than scaling (T, in)
            masks = KeepMasks(x, dropout_p, seed, adt) if dropout_p else None
            device_path = _device_path(x.device)
            for chunk, a, b in _chunks(x):
                keep = masks(chunk, b - a) if dropout_p else None
                if need_x:
                    g = torch.mm(ds[a:b], lora_A)  # (rows, in) in the adapter dtype
                    if device_path and keep is not None:  # one kernel: dX += mask * (dS A)
                        dx[a:b].addcmul_(g, keep)
                    elif device_path:  # mixed dtypes in one kernel
                        dx[a:b].add_(g)
                    else:  # on the CPU a same-dtype add is several times faster than a mixed one
                        if keep is not None:
                            g.mul_(keep)
                        dx[a:b].add_(g if g.dtype == dx.dtype else g.to(dx.dtype))
                if need_a:  # the mask buffer becomes dropout(x) (unscaled: ds carries 1/(1-p))
                    xd = x[a:b].to(adt) if keep is None else keep.mul_(x[a:b])
                    dA.addmm_(ds[a:b].t(), xd)
    dw = torch.mm(dy.t(), x) if need_weight else None
    db = dy.sum(0) if need_bias else None
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
