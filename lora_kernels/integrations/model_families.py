"""What the tuning layer needs to know per model family, and the generic way to find it.

Nothing here is required for a model whose attention goes through transformers'
AttentionInterface: the table only supplies LoRA's default target modules (as PEFT does)."""

from __future__ import annotations

import inspect
import re

from torch import nn

# model_type -> default LoRA target modules (PEFT's defaults for these families).
DEFAULT_LORA_TARGETS: dict[str, list[str]] = {
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "opt": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
}

# task_type -> the task head's module names that PEFT trains and saves (``modules_to_save``).
TASK_HEADS: dict[str, tuple[str, ...]] = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}

# model_type -> the module between the encoder and a sequence classifier's ``classifier`` (BERT's
# ``pooler``: dense + tanh over the first token), looked up at the model's root and then under
# its base model. Checked against transformers 5.x: in each family's ...ForSequenceClassification
# the logits depend on this module (BigBird builds a pooler it does not use: not listed; RoBERTa,
# XLM-R, ELECTRA and others build no pooler, their head lives inside ``classifier``).
CLASSIFIER_POOLERS: dict[str, str] = {
    **dict.fromkeys(
        ["albert", "bert", "canine", "deberta", "deberta-v2", "ernie", "fnet", "gte", "layoutlm", "luke",
         "markuplm", "megatron-bert", "mobilebert", "nomic_bert", "rembert", "roc_bert", "squeezebert", "tapas"],
        "pooler"),
    "distilbert": "pre_classifier",
    "modernbert": "head",
    "eurobert": "dense",
}

# Module names holding per-layer blocks: "<...>.h.3.<...>", "<...>.layers.3.<...>", ...
LAYER_PATTERN = re.compile(r"(?:^|\.)(?:h|layers|layer|blocks|block|decoder_layers)\.(\d+)(?:\.|$)")

_USES_INTERFACE: dict[type, bool] = {}


def uses_attention_interface(module: nn.Module) -> bool:
    """True when the module's forward dispatches through transformers' AttentionInterface
    (``ALL_ATTENTION_FUNCTIONS``), so a registered attention function reaches it."""
    cls = type(module)
    if cls not in _USES_INTERFACE:
        try:
            source = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            source = ""
        _USES_INTERFACE[cls] = "ALL_ATTENTION_FUNCTIONS" in source
    return _USES_INTERFACE[cls]


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every module of ``model`` whose forward calls the attention interface, in model order."""
    return [(name, m) for name, m in model.named_modules() if uses_attention_interface(m)]


def is_cross_attention(module: nn.Module, name: str = "") -> bool:
    """Cross-attention by flag (GPT-2), class name (BERT) or module name (T5's EncDecAttention)."""
    lowered = name.lower()
    return (bool(getattr(module, "is_cross_attention", False)) or "Cross" in type(module).__name__
            or "crossattention" in lowered or "encdecattention" in lowered or "cross_attn" in lowered)


def self_attention_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The self-attention modules in layer order (by ``layer_idx`` where they have one)."""
    found = [(n, m) for n, m in attention_modules(model) if not is_cross_attention(m, n)]
    if found and all(isinstance(getattr(m, "layer_idx", None), int) for _, m in found):
        found.sort(key=lambda item: item[1].layer_idx)
    return found


def layer_index(module_name: str, layers_pattern: str | list[str] | None = None) -> int | None:
    """The block index in a module name (``transformer.h.3.attn.c_attn`` -> 3), or None."""
    if layers_pattern:
        names = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        pattern = re.compile(r"(?:^|\.)(?:" + "|".join(map(re.escape, names)) + r")\.(\d+)(?:\.|$)")
    else:
        pattern = LAYER_PATTERN
    match = pattern.search(module_name)
    return int(match.group(1)) if match else None


# PEFT task type -> the name of transformers' auto mapping listing that task's model classes, in
# the order they are tried; then class-name suffixes for models outside the mappings.
_TASK_MAPPINGS = (
    ("SEQ_CLS", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("TOKEN_CLS", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    ("QUESTION_ANS", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
    ("SEQ_2_SEQ_LM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    ("CAUSAL_LM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("FEATURE_EXTRACTION", "MODEL_MAPPING_NAMES"),
)
_TASK_SUFFIXES = (
    ("SEQ_CLS", ("ForSequenceClassification",)),
    ("TOKEN_CLS", ("ForTokenClassification",)),
    ("QUESTION_ANS", ("ForQuestionAnswering",)),
    ("CAUSAL_LM", ("ForCausalLM", "LMHeadModel")),
)


def infer_task_type(model: nn.Module) -> str | None:
    """PEFT's task type for the model's class (``GPT2LMHeadModel`` -> "CAUSAL_LM",
    ``BertForSequenceClassification`` -> "SEQ_CLS", ``BertModel`` -> "FEATURE_EXTRACTION",
    ...), from transformers' auto mappings, else from the class name; None when neither says
    (e.g. a masked language model, which PEFT has no task type for)."""
    from transformers.models.auto import modeling_auto

    name = type(model).__name__
    for task, mapping_name in _TASK_MAPPINGS:
        for value in getattr(modeling_auto, mapping_name, {}).values():
            if name == value or (isinstance(value, (tuple, list)) and name in value):
                return task
    for task, suffixes in _TASK_SUFFIXES:
        if name.endswith(suffixes):
            return task
    return None


def classifier_pooler(model: nn.Module) -> str | None:
    """The module path of the pooler feeding a sequence classifier's head (``bert.pooler`` for
    ``BertForSequenceClassification``), or None. Only a path that no other module name ends
    with is returned, since PEFT matches ``modules_to_save`` by name suffix."""
    name = CLASSIFIER_POOLERS.get(getattr(getattr(model, "config", None), "model_type", None))
    if name is None:
        return None
    modules = dict(model.named_modules())
    prefix = getattr(model, "base_model_prefix", "")
    for path in (name, f"{prefix}.{name}" if prefix else name):
        module = modules.get(path)
        if isinstance(module, nn.Module) and any(True for _ in module.parameters()):
            if sum(n.endswith(path) for n in modules) == 1:
                return path
    return None


def text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def attention_geometry(model: nn.Module) -> tuple[int, int, int, int]:
    """(num_layers, num_attention_heads, num_kv_heads, head_dim) from the model's config."""
    cfg = text_config(model)
    heads = getattr(cfg, "num_attention_heads", None)
    hidden = getattr(cfg, "hidden_size", None)
    layers = getattr(cfg, "num_hidden_layers", None)
    if not (heads and hidden and layers):
        raise ValueError(
            f"{type(model).__name__}: its config lacks num_attention_heads / hidden_size / "
            "num_hidden_layers, so the prefix shape cannot be derived"
        )
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    return int(layers), int(heads), int(kv_heads), int(head_dim)
