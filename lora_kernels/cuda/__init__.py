"""The ``cuda`` backend: thin Python wrappers over the compiled ops in
``torch.ops.lora_kernels_cuda`` (built from ``csrc/`` into ``lora_kernels._C``).

One module per operator (``lora_linear``, ``prefix_attention``), each exposing the backend
contract ``forward``, ``backward`` and ``not_supported_reasons``; ``extension`` loads the
compiled object and says why it cannot be used. Importing these modules never needs the
extension; :func:`ops` loads it on first use and registers the fake (meta) implementations that
let ``torch.compile`` trace the CUDA ops.
"""

from __future__ import annotations

import torch

from ..backends import dtype_name  # noqa: F401  (re-exported for the backend modules)
from . import extension

_fakes_registered = False


def capability_reasons(device: torch.device) -> list[str]:
    """The kernels use bf16 tensor cores (mma.sync) and cp.async: compute capability 8.0 or newer."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return []
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return [f"the CUDA kernels need compute capability 8.0 or newer, got {major}.{minor}"]
    return []


def ops():
    """``torch.ops.lora_kernels_cuda``, after loading the extension and registering the fake
    implementations. Raises ``RuntimeError`` naming the reason when the extension is missing."""
    global _fakes_registered
    extension.load()
    if not _fakes_registered:
        from . import lora_linear, prefix_attention

        lora_linear.register_fakes()
        prefix_attention.register_fakes()
        _fakes_registered = True
    return torch.ops.lora_kernels_cuda


#: Every op of the extension with its schema (the tests check the registered schemas against it).
SCHEMAS: dict[str, str] = {
    "lora_shrink": "lora_kernels_cuda::lora_shrink(Tensor x, Tensor lora_A, float dropout_p, "
    "int seed) -> Tensor",
    "lora_expand": "lora_kernels_cuda::lora_expand(Tensor s, Tensor lora_B, Tensor? bias, "
    "float scaling, ScalarType out_dtype) -> Tensor",
    "lora_grad_s_b": "lora_kernels_cuda::lora_grad_s_b(Tensor dy, Tensor s, Tensor lora_B, "
    "float scaling, bool need_dB) -> (Tensor, Tensor)",
    "lora_grad_x_a": "lora_kernels_cuda::lora_grad_x_a(Tensor ds, Tensor x, Tensor lora_A, "
    "float dropout_p, int seed, bool need_dx, bool need_dA) -> (Tensor, Tensor)",
    "prefix_attention_fwd": "lora_kernels_cuda::prefix_attention_fwd(Tensor q, Tensor k, "
    "Tensor v, Tensor prefix_k, Tensor prefix_v, Tensor? key_padding_mask, bool causal, "
    "float scale) -> (Tensor, Tensor)",
    "prefix_attention_bwd": "lora_kernels_cuda::prefix_attention_bwd(Tensor dout, Tensor q, "
    "Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, Tensor? key_padding_mask, "
    "Tensor out, Tensor lse, bool causal, float scale) -> (Tensor, Tensor, Tensor, Tensor, "
    "Tensor)",
}
