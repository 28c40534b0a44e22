"""nn.Modules built on the ops: LoRALinear, prefix and prompt encoders. Nothing here imports
transformers."""

from .lora_linear import LoRALinear
from .prefix_encoder import PrefixEncoder
from .prompt_encoder import PromptEncoder

__all__ = ["LoRALinear", "PrefixEncoder", "PromptEncoder"]
