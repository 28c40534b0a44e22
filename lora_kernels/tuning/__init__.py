"""The tuning layer: full fine-tuning, prompt tuning, prefix tuning and LoRA on transformers
models, with PEFT's on-disk adapter format both ways.

Files: ``api`` (``tune``, ``load_adapter``), ``model`` (``TunedModel``), one file per method
(``lora``, ``prefix``, ``prompt``, ``full``), ``targets`` (which modules a config names),
``changes`` (undoable changes the methods share), ``io`` (the file format), ``config``."""

from .api import load_adapter, tune
from .config import (
    FullFineTuningConfig,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    TuningConfig,
)
from .model import TunedModel

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
