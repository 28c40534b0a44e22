"""Prompt tuning: a ``PromptEncoder``'s virtual-token embeddings before the input embeddings
(the attention mask, token types and labels extended to match, as PEFT)."""

from __future__ import annotations

import inspect
import warnings

import torch
from torch import nn

from ..integrations.model_families import attention_geometry
from ..nn.prompt_encoder import PromptEncoder
from .changes import apply_modules_to_save, freeze
from .config import PromptTuningConfig
from .targets import modules_to_save_names


def tune_prompt(tuned, config: PromptTuningConfig) -> None:
    """Build the encoder (initialised per ``prompt_tuning_init``; fp32 over a half-precision
    model) and freeze the model."""
    model = tuned.base_model
    get_emb = getattr(model, "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) else None
    if emb is None or not hasattr(emb, "weight"):
        raise ValueError(f"PromptTuningConfig: {type(model).__name__} has no input embeddings")
    hidden = emb.weight.shape[1]
    if config.token_dim is not None and config.token_dim != hidden:
        raise ValueError(f"PromptTuningConfig.token_dim={config.token_dim} does not fit "
                         f"{type(model).__name__} (hidden size {hidden})")
    if "inputs_embeds" not in inspect.signature(model.forward).parameters:
        raise ValueError(f"PromptTuningConfig: {type(model).__name__}.forward takes no inputs_embeds")
    keep = modules_to_save_names(model, config)
    init = _initial_embeddings(model, config, config.num_virtual_tokens)
    layers, heads, _, _ = attention_geometry(model)
    config.token_dim, config.num_layers, config.num_attention_heads = hidden, layers, heads
    config.num_transformer_submodules = config.num_transformer_submodules or 1
    dtype = torch.float32 if emb.weight.dtype in (torch.float16, torch.bfloat16) else emb.weight.dtype
    encoder = PromptEncoder(config.num_virtual_tokens, hidden, init=init, device=emb.weight.device, dtype=dtype)
    if init is None:
        with torch.no_grad():  # PEFT's RANDOM init: nn.Embedding's normal init
            encoder.embedding.weight.normal_()
    freeze(tuned)
    tuned.prompt_encoder = encoder
    apply_modules_to_save(tuned, keep)


def _initial_embeddings(model: nn.Module, config: PromptTuningConfig, P: int) -> torch.Tensor | None:
    """(P, hidden) start values: None for RANDOM, embeddings of random vocabulary tokens
    (SAMPLE_VOCAB) or of the init text's tokens repeated to length P (TEXT)."""
    emb = model.get_input_embeddings()
    if config.prompt_tuning_init == "RANDOM":
        return None
    if config.prompt_tuning_init == "SAMPLE_VOCAB":
        ids = torch.randint(0, emb.weight.shape[0], (P,), device=emb.weight.device)
        return emb(ids).detach().clone()
    tokenizer = config.tokenizer
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **(config.tokenizer_kwargs or {}))
    ids = tokenizer(config.prompt_tuning_init_text)["input_ids"]
    if not ids:
        raise ValueError("prompt_tuning_init_text tokenises to nothing")
    ids = (ids * (P // len(ids) + 1))[:P]
    return emb(torch.tensor(ids, device=emb.weight.device)).detach().clone()


def prepend_virtual_tokens(encoder: PromptEncoder, model: nn.Module, input_ids=None, attention_mask=None,
                           inputs_embeds=None, labels=None, position_ids=None, token_type_ids=None,
                           **kwargs) -> dict:
    """The model's forward arguments with the virtual tokens in front: embeddings (B, P+L, H),
    attention mask and token types extended by P, labels of the input's length (B, L) extended
    by P times -100 (as PEFT); ``position_ids`` dropped (as PEFT, with a warning)."""
    if inputs_embeds is None:
        if input_ids is None:
            raise ValueError("prompt tuning: pass input_ids or inputs_embeds")
        inputs_embeds = model.get_input_embeddings()(input_ids)
    batch, length = inputs_embeds.shape[:2]
    P = encoder.num_virtual_tokens
    inputs_embeds = encoder.prepend(inputs_embeds)
    if position_ids is not None:
        warnings.warn("prompt tuning: position_ids are ignored (as PEFT)", stacklevel=4)
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask.new_ones(batch, P), attention_mask], 1)
    if token_type_ids is not None:
        token_type_ids = torch.cat([token_type_ids.new_zeros(batch, P), token_type_ids], 1)
    if labels is not None and labels.dim() == 2 and labels.shape[1] == length:
        labels = torch.cat([labels.new_full((batch, P), -100), labels], 1)
    out = dict(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
    if labels is not None:
        out["labels"] = labels
    if token_type_ids is not None:
        out["token_type_ids"] = token_type_ids
    return out
