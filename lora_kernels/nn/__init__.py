"""nn.Modules built on the ops: LoRALinear, prefix and prompt encoders. Nothing here imports
transformers."""

from .lora_linear import LoRALinear

__all__ = ["LoRALinear"]
