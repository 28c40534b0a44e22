"""Tiny local model folders for tests: random weights from small configs, saved with
save_pretrained beside the MiniLM package's tokenizer (no network)."""

from __future__ import annotations

from pathlib import Path

import torch


def minilm_tokenizer():
    from transformers import AutoTokenizer

    from lora_kernels.training.demo import minilm_folder

    return AutoTokenizer.from_pretrained(minilm_folder())


def save_tiny_bert(folder: Path, num_labels: int = 2) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    tok = minilm_tokenizer()
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=64, num_labels=num_labels)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def save_tiny_llama(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = minilm_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
                      eos_token_id=tok.sep_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
