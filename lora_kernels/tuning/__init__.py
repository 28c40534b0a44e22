"""The tuning layer: full fine-tuning, prompt tuning, prefix tuning and LoRA on transformers
models, with PEFT's on-disk adapter format both ways."""

from .config import (
    FullFineTuningConfig,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    TuningConfig,
)
from .io import load_adapter
from .model import TunedModel, tune

__all__ = [
    "FullFineTuningConfig",
    "LoraConfig",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "TuningConfig",
    "TunedModel",
    "load_adapter",
    "tune",
]
