"""Shared pieces of the lora_linear tests: random inputs of a case, the dropout mask a backend
draws, and the plain formula through autograd (float64 reference and same-dtype baseline)."""

from __future__ import annotations

import importlib

import torch
from helpers import assert_close_to_reference

BACKEND_MODULES = {
    "torch": "lora_kernels.reference.lora_linear",
    "triton": "lora_kernels.triton.lora_linear",
}
GRAD_NAMES = ("x", "weight", "bias", "lora_A", "lora_B")


def backend_module(name: str):
    return importlib.import_module(BACKEND_MODULES[name])


def make_inputs(T, in_f, out_f, r, dtype, *, adapter_dtype=None, bias=True, transposed_w=False,
                strided_x=False, lead=None):
    """Random inputs (never all zero). ``transposed_w``: weight is a transposed (in, out)
    buffer, as the op passes it for fan_in_fan_out; ``strided_x``: x is a column slice of a
    wider buffer (row stride != in)."""
    adapter_dtype = adapter_dtype or dtype
    shape = (*lead, in_f) if lead else (T, in_f)
    if strided_x:
        x = torch.randn(*shape[:-1], in_f + 3, dtype=dtype)[..., 2 : 2 + in_f]
    else:
        x = torch.randn(*shape, dtype=dtype)
    if transposed_w:
        weight = (torch.randn(in_f, out_f, dtype=dtype) / in_f**0.5).t()
    else:
        weight = torch.randn(out_f, in_f, dtype=dtype) / in_f**0.5
    b = torch.randn(out_f, dtype=dtype) if bias else None
    lora_A = torch.randn(r, in_f, dtype=adapter_dtype) / in_f**0.5
    lora_B = torch.randn(out_f, r, dtype=adapter_dtype) / r**0.5
    return x, weight, b, lora_A, lora_B


def mask_of(backend: str, T: int, in_f: int, p: float, seed: int, device="cpu") -> torch.Tensor:
    """The keep-mask (T, in) a backend draws for (seed, shape): read back through ``s`` with
    ``x = 1`` and ``A`` = 256-row blocks of the identity (the mask depends on the seed and the
    element index only, not on A). For the triton backend, also checks that the bits it stores
    in ``s`` for the backward are the mask it applied."""
    if p == 0:
        return torch.ones(T, in_f, dtype=torch.bool, device=device)
    mod = backend_module(backend)
    x = torch.ones(T, in_f, device=device)
    eye = torch.eye(in_f, device=device)
    blocks, stored = [], []
    for c0 in range(0, in_f, 256):
        a = eye[c0 : c0 + 256]
        _, s = mod.forward(x, torch.zeros(1, in_f, device=device), None, a,
                           torch.zeros(1, a.shape[0], device=device), 1.0, p, seed)
        s_r = s[:, : a.shape[0]]
        scaled_01 = (s_r == 0) | ((s_r - 1 / (1 - p)).abs() < 1e-5)
        assert torch.all(scaled_01), "s is not a scaled 0/1 mask"
        blocks.append(s_r != 0)
        if backend == "triton":
            from lora_kernels.triton.lora_dropout import unpack_keep

            stored.append(unpack_keep(s, a.shape[0], in_f))
    keep = torch.cat(blocks, dim=1)
    for bits in stored:
        assert torch.equal(bits, keep), "the stored mask bits differ from the mask applied"
    return keep


def formula(x, weight, bias, lora_A, lora_B, scaling, keep=None, p=0.0):
    """Plain PyTorch, PEFT's way: the LoRA branch in the adapter dtype, the sum cast to x's."""
    xd = x if keep is None else x * keep.to(x.dtype) / (1 - p)
    y = torch.nn.functional.linear(x, weight, bias)
    lora = (xd.to(lora_A.dtype) @ lora_A.t()) @ lora_B.t() * scaling
    return (y + lora).to(x.dtype)


def formula_grads(inputs, scaling, dy, keep=None, p=0.0, dtype_of=None, needs=(True,) * 5):
    """Output and gradients of :func:`formula` on copies of ``inputs`` (cast to float64 when
    ``dtype_of`` is float64). Returns [y, dx, dW, db, dA, dB] (None where not needed / no bias)."""
    leaves = []
    for t, need in zip(inputs, needs):
        if t is None:
            leaves.append(None)
            continue
        c = t.detach().clone()
        if dtype_of is not None:
            c = c.to(dtype_of)
        leaves.append(c.requires_grad_(need))
    y = formula(*leaves, scaling, keep, p)
    y.backward(dy.to(y.dtype))
    return [y.detach()] + [None if t is None or not t.requires_grad else t.grad for t in leaves]


def check_against_reference(got, inputs, scaling, dy, keep, p, needs=(True,) * 5, names=None):
    """``got`` = [y, dx, dW, db, dA, dB] from the code under test; checks each against the
    float64 formula with the tolerance rule (baseline: the same formula in the inputs' dtypes)."""
    ref = formula_grads(inputs, scaling, dy, keep, p, torch.float64, needs)
    base = formula_grads(inputs, scaling, dy, keep, p, None, needs)
    names = names or ("y",) + GRAD_NAMES
    for name, g, r, b in zip(names, got, ref, base):
        if r is None:
            assert g is None, f"{name}: expected no gradient, got one"
            continue
        assert g is not None, f"{name}: missing gradient"
        assert g.dtype == b.dtype, f"{name}: dtype {g.dtype}, expected {b.dtype}"
        assert_close_to_reference(g, r, b, name=name)


def philox_keep(T: int, in_f: int, p: float, seed: int) -> torch.Tensor:
    """The Triton backend's keep-mask by its definition (lora_kernels/triton/lora_dropout.py),
    computed independently in numpy: Philox4x32-10 with key = the 64-bit seed and counter =
    (column // 8, row, 0, 0); column 8 g + i keeps when half i % 2 of word i // 2 is
    >= round(65536 p)."""
    import numpy as np

    m32 = np.uint64(0xFFFFFFFF)
    g, rows = np.meshgrid(np.arange((in_f + 7) // 8, dtype=np.uint64),
                          np.arange(T, dtype=np.uint64))
    c = [g, rows, np.zeros_like(g), np.zeros_like(g)]
    seed &= (1 << 64) - 1
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    for _ in range(10):
        prod_b, prod_a = np.uint64(0xCD9E8D57) * c[2], np.uint64(0xD2511F53) * c[0]
        c = [(prod_b >> np.uint64(32)) ^ c[1] ^ k0, prod_b & m32,
             (prod_a >> np.uint64(32)) ^ c[3] ^ k1, prod_a & m32]
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & m32, (k1 + np.uint64(0xBB67AE85)) & m32
    words = np.stack(c, axis=-1)  # (T, G, 4)
    halves = np.stack([words & np.uint64(0xFFFF), words >> np.uint64(16)], axis=-1)  # (T, G, 4, 2)
    keep = halves.reshape(T, -1)[:, :in_f] >= min(round(p * 65536), 65535)
    return torch.from_numpy(keep)
