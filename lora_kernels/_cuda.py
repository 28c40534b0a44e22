"""Loader of the compiled CUDA extension (built from csrc/ by setup.py).

The package imports without it: :func:`unavailable_reason` says why it cannot be used
(not built, built for another torch, no GPU), and the ``cuda`` backend reports that reason.
"""

from __future__ import annotations


def unavailable_reason() -> str | None:
    """Why the CUDA extension cannot be used here, or ``None`` when it can."""
    return "extension not built"
