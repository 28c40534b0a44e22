"""torch.autocast at the ops' boundary: inputs are cast as autocast would cast them for the
PyTorch op each one stands for (F.linear, scaled_dot_product_attention: to the autocast dtype),
and the backends then run with autocast off, computing in their inputs' dtypes."""

from __future__ import annotations

import torch


def cast_inputs(device_type: str, *tensors):
    """``tensors`` in the autocast dtype when autocast is on for ``device_type`` (float64, None
    and non-float values left alone, as autocast does); unchanged otherwise."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype == torch.float64:
            return t  # left for the argument checks to judge
        return t.to(dtype)

    return tuple(cast(t) for t in tensors)


def disabled(device_type: str):
    """Context in which autocast does not recast inside a backend."""
    return torch.autocast(device_type, enabled=False)
