"""What every Triton launcher needs to know about where it runs."""

from __future__ import annotations

from ..backends import interpreter_enabled

# Triton's CPU interpreter multiplies the raw bits of bf16 operands in tl.dot (seen with
# Triton 3.8), so launchers pass this as a constexpr telling kernels to cast tiles to fp32
# before tl.dot. On a GPU it is False and bf16 dots stay on the tensor cores.
INTERPRETER: bool = interpreter_enabled()
