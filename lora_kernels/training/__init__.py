"""Training entry tier (imports transformers): data loading and checks, the four methods as one
call, the train / validate / test loop shared by ``make demo`` and ``lora-kernels finetune``."""

from .data import DataError, load_records, split_records, tokenize
from .loop import TrainConfig, count_parameters, evaluate, fit
from .methods import METHODS, MethodConfig, apply_method
from .metrics import accuracy, macro_f1

__all__ = [
    "DataError", "load_records", "split_records", "tokenize", "TrainConfig", "count_parameters",
    "evaluate", "fit", "METHODS", "MethodConfig", "apply_method", "accuracy", "macro_f1",
]
