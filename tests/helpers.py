"""Shared test helpers: the tolerance rule of the test oracle (docs/ARCHITECTURE.md).

A fused result passes when its error against the float64 reference is at most about twice
the error of the same-dtype PyTorch path, plus a small floor in units of the dtype's epsilon
(so a baseline that happens to be exact does not demand exactness).
"""

from __future__ import annotations

import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref.double()).abs().max().item() if a.numel() else 0.0


def assert_close_to_reference(
    got: torch.Tensor,
    ref64: torch.Tensor,
    baseline: torch.Tensor,
    name: str = "output",
    factor: float = 2.0,
    floor_eps: float = 8.0,
) -> None:
    """``got``: result under test; ``ref64``: float64 reference; ``baseline``: the same result
    computed by plain PyTorch in ``got``'s dtype."""
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    eps = torch.finfo(got.dtype).eps
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    floor = floor_eps * eps * max(scale, 1.0)
    err, base = max_err(got, ref64), max_err(baseline, ref64)
    assert err <= factor * base + floor, (
        f"{name}: max error {err:.3e} > {factor} x baseline {base:.3e} + floor {floor:.3e} "
        f"(dtype {got.dtype}, |ref| max {scale:.3e})"
    )
