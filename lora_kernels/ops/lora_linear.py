"""lora_linear: y = x W^T + b + s * dropout(x) A^T B^T.  (Placeholder: plain autograd until the
fused op lands; the signature is final.)"""

from __future__ import annotations

import torch


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, *, training=True,
                fan_in_fan_out=False, seed=None, backend="auto"):
    """x (..., in), weight (out, in) [(in, out) with fan_in_fan_out], bias (out,) or None,
    lora_A (r, in), lora_B (out, r) -> (..., out)."""
    w = weight.t() if fan_in_fan_out else weight
    y = torch.nn.functional.linear(x, w, bias)
    xd = torch.nn.functional.dropout(x, dropout_p, training) if dropout_p > 0 else x
    return y + scaling * (xd.to(lora_A.dtype) @ lora_A.t() @ lora_B.t()).to(y.dtype)
