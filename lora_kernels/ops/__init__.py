"""The two fused operators, one file each: the custom op, backend dispatch, the public function."""

from .lora_linear import lora_linear
from .prefix_attention import prefix_attention

__all__ = ["lora_linear", "prefix_attention"]
