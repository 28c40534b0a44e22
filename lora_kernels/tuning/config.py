"""Configuration dataclasses for the four tuning methods. Field names follow PEFT 0.21's
configs where PEFT has the field, so an ``adapter_config.json`` reads both ways."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
PROMPT_INITS = ("RANDOM", "TEXT", "SAMPLE_VOCAB")
# Fields that exist here but not in PEFT's config of the same method: kept out of
# adapter_config.json (written to lora_kernels_config.json beside it instead).
_NOT_IN_PEFT = {"tokenizer", "prompt_template", "verbalizer", "frozen_modules", "gradient_checkpointing",
                "train_pooler"}


@dataclass(kw_only=True)
class TuningConfig:
    """Fields common to every method (as PEFT's ``PeftConfig``). ``task_type`` None: inferred
    from the model class by ``tune`` (see ``integrations.model_families.infer_task_type``)."""

    peft_type: ClassVar[str] = ""
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        if self.task_type is not None and str(self.task_type) not in TASK_TYPES:
            raise ValueError(f"task_type: expected one of {TASK_TYPES} or None, got {self.task_type!r}")
        if self.task_type is not None:
            self.task_type = str(self.task_type)

    def to_dict(self, *, peft_only: bool = False) -> dict[str, Any]:
        """The config as a JSON-ready dict, with ``peft_type``."""
        out = {}
        for f in dataclasses.fields(self):
            if peft_only and f.name in _NOT_IN_PEFT:
                continue
            value = getattr(self, f.name)
            if f.name == "tokenizer":
                continue
            if isinstance(value, (set, tuple)):
                value = sorted(value) if isinstance(value, set) else list(value)
            out[f.name] = value
        out["peft_type"] = self.peft_type
        return out

    @staticmethod
    def from_dict(data: dict[str, Any]) -> TuningConfig:
        """Build the config class named by ``data["peft_type"]``; fields this class does not
        know are ignored (PEFT writes many we have no use for)."""
        peft_type = data.get("peft_type")
        classes = {c.peft_type: c for c in (LoraConfig, PromptTuningConfig, PrefixTuningConfig,
                                            FullFineTuningConfig)}
        if peft_type not in classes:
            raise ValueError(f"adapter config: peft_type {peft_type!r} is not one of {sorted(classes)}")
        cls = classes[peft_type]
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(kw_only=True)
class FullFineTuningConfig(TuningConfig):
    """All parameters trainable, except those under ``frozen_modules`` (names or suffixes);
    ``modules_to_save`` stay trainable even under a frozen parent (a task head)."""

    peft_type: ClassVar[str] = "FULL"
    frozen_modules: list[str] | None = None
    modules_to_save: list[str] | None = None
    gradient_checkpointing: bool = False


@dataclass(kw_only=True)
class _PromptLearningConfig(TuningConfig):
    num_virtual_tokens: int = 8
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None
    train_pooler: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens: expected a positive int, got {self.num_virtual_tokens!r}")
        _check_bool("train_pooler", self.train_pooler)


@dataclass(kw_only=True)
class PromptTuningConfig(_PromptLearningConfig):
    """Prompt tuning (Lester et al.): ``num_virtual_tokens`` trainable embeddings before the
    input. ``prompt_tuning_init``: "RANDOM", "TEXT" (embeddings of ``prompt_tuning_init_text``,
    tokenised by ``tokenizer`` or ``tokenizer_name_or_path``, repeated to length) or
    "SAMPLE_VOCAB" (embeddings of random vocabulary tokens). ``prompt_template`` (with an
    ``{input}`` slot, e.g. ``"Review: {input}\\nSentiment:"``) and ``verbalizer`` (label ->
    word) serve classification with a language-model head.

    ``modules_to_save``: modules trained in full and saved with the adapter. With
    ``task_type="SEQ_CLS"`` the task head is added to them: the classifier (``classifier`` or
    ``score``) and, where the model has one feeding it, the pooler (BERT's ``pooler``,
    DistilBERT's ``pre_classifier``, ...); ``train_pooler=False`` leaves the pooler frozen, as
    PEFT does."""

    peft_type: ClassVar[str] = "PROMPT_TUNING"
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None
    tokenizer: Any = field(default=None, repr=False)
    prompt_template: str | None = None
    verbalizer: dict[str, str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        init = str(getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init)).upper()
        if init not in PROMPT_INITS:
            raise ValueError(f"prompt_tuning_init: expected one of {PROMPT_INITS}, got {self.prompt_tuning_init!r}")
        self.prompt_tuning_init = init
        if init == "TEXT":
            if not self.prompt_tuning_init_text:
                raise ValueError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text")
            if self.tokenizer is None and not self.tokenizer_name_or_path:
                raise ValueError("prompt_tuning_init='TEXT' needs a tokenizer or tokenizer_name_or_path")
        if self.prompt_template is not None and "{input}" not in self.prompt_template:
            raise ValueError(f"prompt_template: expected an '{{input}}' slot, got {self.prompt_template!r}")

    def format(self, text: str) -> str:
        """The template filled with ``text`` (``text`` itself when there is no template)."""
        return text if self.prompt_template is None else self.prompt_template.replace("{input}", text)


@dataclass(kw_only=True)
class PrefixTuningConfig(_PromptLearningConfig):
    """Prefix tuning (Li and Liang): ``num_virtual_tokens`` learned keys and values per layer,
    optionally through the reparameterisation MLP (``prefix_projection``, hidden width
    ``encoder_hidden_size``). ``modules_to_save`` and ``train_pooler`` as for prompt tuning."""

    peft_type: ClassVar[str] = "PREFIX_TUNING"
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False


@dataclass(kw_only=True)
class LoraConfig(TuningConfig):
    """LoRA (Hu et al.): ``W x + (lora_alpha / r) B A dropout(x)`` on ``target_modules``
    (names matched as the full name or a ``.``-suffix, a regex string matched in full, or
    "all-linear": every Linear/Conv1D but the output head, the task head and the classifier's
    pooler). ``bias``: "none", "all" or "lora_only" biases trainable. ``use_rslora``: scale
    ``lora_alpha / sqrt(r)``. ``init_lora_weights``: True (Kaiming A, zero B), "gaussian", or
    False. ``modules_to_save`` and ``train_pooler`` as for prompt tuning: with
    ``task_type="SEQ_CLS"`` the classifier and its pooler train in full by default."""

    peft_type: ClassVar[str] = "LORA"
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    train_pooler: bool = True
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r: expected a positive int, got {self.r!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout: expected a value in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias: expected 'none', 'all' or 'lora_only', got {self.bias!r}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"init_lora_weights: expected True, False or 'gaussian', got {self.init_lora_weights!r}")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        _check_bool("train_pooler", self.train_pooler)


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {value!r}")
