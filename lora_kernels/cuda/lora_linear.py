"""``cuda`` backend of ``lora_linear``: ``y = x W^T + b + s * dropout(x) A^T B^T``.

The base products are cuBLAS through ATen, accumulated (beta = 1) onto buffers the extension's
kernels (``csrc/lora_linear``) fill with the LoRA terms, so no LoRA term makes an extra pass
over a (T, out) or (T, in) tensor:

- ``lora_shrink``: ``S = dropout(x) A^T / (1 - p)`` (T, r) fp32; one Philox call per four
  elements of x gives their mask bits (pure function of ``(seed, t, i)``).
- ``lora_expand``: ``y = s S B^T + b`` in x's dtype; then ``y += x W^T`` (``addmm_``).
- ``lora_grad_s_b``: ``dS = s dY B`` and ``dB = s dY^T S`` in one pass over ``dY``.
- ``lora_grad_x_a``: ``dx = mask (dS A) / (1 - p)`` (then ``dx += dY W``) and
  ``dA = dS^T dropout(x) / (1 - p)``, the mask generated once more and handed bit-packed from
  the first to the second kernel.

Every product is on tensor cores; fp16/fp32 operands are split into bf16 terms so that fp32
adapters (PEFT's default) get fp32-accurate ``S``, ``dS``, ``dA``, ``dB``. Reductions are
deterministic (partials summed in a fixed order, no atomics).

Equivalent PyTorch::

    s = F.dropout(x, p) @ A.T                      # the mask comes from Philox(seed, index)
    y = F.linear(x, W, b) + scaling * s @ B.T
"""

from __future__ import annotations

import torch

from ..backends import Capabilities
from . import capability_reasons, dtype_name

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CAPABILITIES = Capabilities(devices=("cuda",), dtypes=SUPPORTED_DTYPES)



def not_supported_reasons(x, weight, bias, lora_A, lora_B, dropout_p, training) -> list[str]:
    """Why the CUDA kernels cannot serve these inputs (empty list: they can).

    Arguments as in :func:`forward`; ``training`` only matters through ``dropout_p`` (the op
    passes ``dropout_p = 0`` in eval), so dropout is supported in both modes.
    """
    reasons: list[str] = []
    tensors = {"x": x, "weight": weight, "lora_A": lora_A, "lora_B": lora_B}
    if bias is not None:
        tensors["bias"] = bias
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            return [f"{name} is not a tensor"]
    reasons += CAPABILITIES.reasons({"x": x, "lora_A": lora_A, "lora_B": lora_B})
    reasons += capability_reasons(next(iter(tensors.values())).device)
    if len({t.device for t in tensors.values()}) > 1:
        reasons.append("the tensors are on different devices")
    if weight.dtype != x.dtype:
        reasons.append(f"weight dtype {dtype_name(weight.dtype)} differs from x dtype {dtype_name(x.dtype)}")
    if bias is not None and bias.dtype != x.dtype:
        reasons.append(f"bias dtype {dtype_name(bias.dtype)} differs from x dtype {dtype_name(x.dtype)}")
    if x.dim() != 2:
        reasons.append(f"x must be 2-D (tokens, in), got {x.dim()}-D")
    if weight.dim() != 2 or lora_A.dim() != 2 or lora_B.dim() != 2:
        reasons.append("weight, lora_A and lora_B must be 2-D")
    if not 0.0 <= float(dropout_p) < 1.0:
        reasons.append(f"dropout_p must be in [0, 1), got {dropout_p}")
    return reasons


def forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    """``(y, s)``: y (T, out) in x's dtype, s (T, r) float32 = dropout(x) A^T (unscaled).

    x (T, in) fp32/fp16/bf16, any strides; weight (out, in) in x's dtype, any strides; bias
    (out,) or None; lora_A (r, in) and lora_B (out, r) in the adapter dtype (may differ from x);
    scaling float; dropout_p in [0, 1) (0: no mask); seed int (the mask's Philox key).
    """
    from . import ops

    lib = ops()
    s = lib.lora_shrink(x, lora_A, float(dropout_p), int(seed or 0))
    y = lib.lora_expand(s, lora_B, bias, float(scaling), x.dtype)
    y.addmm_(x, weight.t())
    return y, s


def backward(dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed, needs):
    """``(dx, dweight, dbias, dA, dB)`` with None where ``needs`` (x, weight, bias, lora_A,
    lora_B) is False. dy (T, out) in x's dtype; s the forward's (T, r) float32 output.
    dweight (out, in) in the layout passed; dA/dB in the adapter dtype."""
    from . import ops

    lib = ops()
    need_x, need_w, need_bias, need_a, need_b = (bool(n) for n in needs)
    p, seed = float(dropout_p), int(seed or 0)
    dx = dweight = dbias = d_a = d_b = None
    if need_x or need_a or need_b:
        ds, db32 = lib.lora_grad_s_b(dy, s, lora_B, float(scaling), need_b)
        if need_b:
            d_b = db32.to(lora_B.dtype)
        if need_x or need_a:
            dx_lora, da32 = lib.lora_grad_x_a(ds, x, lora_A, p, seed, need_x, need_a)
            if need_x:
                dx = dx_lora.addmm_(dy, weight)
            if need_a:
                d_a = da32.to(lora_A.dtype)
    if need_w:
        dweight = torch.mm(dy.t(), x)
    if need_bias:
        dbias = dy.sum(0)
    return dx, dweight, dbias, d_a, d_b


def register_fakes() -> None:
    """Fake (meta) implementations of the LoRA ops, so torch.compile can trace them."""

    @torch.library.register_fake("lora_kernels_cuda::lora_shrink")
    def _shrink(x, lora_A, dropout_p, seed):
        return x.new_empty((x.shape[0], lora_A.shape[0]), dtype=torch.float32)

    @torch.library.register_fake("lora_kernels_cuda::lora_expand")
    def _expand(s, lora_B, bias, scaling, out_dtype):
        return s.new_empty((s.shape[0], lora_B.shape[0]), dtype=out_dtype)

    @torch.library.register_fake("lora_kernels_cuda::lora_grad_s_b")
    def _grad_s_b(dy, s, lora_B, scaling, need_dB):
        ds = dy.new_empty((dy.shape[0], s.shape[1]), dtype=torch.float32)
        db_shape = (lora_B.shape[0], s.shape[1]) if need_dB else (0,)
        return ds, dy.new_empty(db_shape, dtype=torch.float32)

    @torch.library.register_fake("lora_kernels_cuda::lora_grad_x_a")
    def _grad_x_a(ds, x, lora_A, dropout_p, seed, need_dx, need_dA):
        dx = x.new_empty(x.shape if need_dx else (0,))
        da_shape = (lora_A.shape[0], x.shape[1]) if need_dA else (0,)
        return dx, x.new_empty(da_shape, dtype=torch.float32)
