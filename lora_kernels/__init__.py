"""lora_kernels: fused Triton and CUDA kernels for LoRA and prefix-augmented attention, and a
PEFT-compatible layer that applies full fine-tuning, prompt tuning, prefix tuning and LoRA to
Hugging Face transformers models.

    import lora_kernels as lk
    y = lk.lora_linear(x, W, b, A, B, scaling=2.0, dropout_p=0.1)
    out = lk.prefix_attention(q, k, v, prefix_k, prefix_v, causal=True)
"""

from __future__ import annotations

import importlib

from .backends import get_backend, set_backend
from .ops import lora_linear, prefix_attention

__version__ = "0.1.0"

# Names served lazily so that `import lora_kernels` stays light (no transformers import).
_LAZY = {
    "tune": ".tuning",
    "load_adapter": ".tuning",
    "TunedModel": ".tuning",
    "FullFineTuningConfig": ".tuning",
    "PromptTuningConfig": ".tuning",
    "PrefixTuningConfig": ".tuning",
    "LoraConfig": ".tuning",
    "enable_fused_attention": ".integrations.transformers",
    "LoRALinear": ".nn",
}

# Subpackages imported on first attribute access (`lk.nn.LoRALinear` works after a bare
# `import lora_kernels`); only `tuning`, `integrations` and `training` reach transformers.
_SUBMODULES = ("nn", "tuning", "integrations", "training", "reference", "triton", "cuda", "cli")

__all__ = ["lora_linear", "prefix_attention", "set_backend", "get_backend", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'lora_kernels' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_SUBMODULES})
