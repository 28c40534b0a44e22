"""Tiny transformers models with random weights for the tuning tests (2 layers, width 32,
vocab 100, dropout 0), and a snapshot that says whether a model changed at all."""

from __future__ import annotations

import pytest
import torch

VOCAB = 100
KINDS = ["gpt2", "llama", "bert"]
DECODERS = ["gpt2", "llama"]


def make_model(kind: str, attn: str = "sdpa", seed: int = 0, init_range: float = 0.02):
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64,
                            resid_pdrop=0.0, initializer_range=init_range, embd_pdrop=0.0, attn_pdrop=0.0,
                            bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model = tf.GPT2LMHeadModel(cfg)
    elif kind == "llama":
        cfg = tf.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=64, vocab_size=VOCAB,
                             max_position_embeddings=64, initializer_range=init_range, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model = tf.LlamaForCausalLM(cfg)
    elif kind == "bert":
        cfg = tf.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                            intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                            num_labels=3, pad_token_id=0, initializer_range=init_range)
        model = tf.BertForSequenceClassification(cfg)
    else:
        raise ValueError(kind)
    model.set_attn_implementation(attn)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = 0
    return model.eval()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and the CI machine's cores are shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def task_type(kind: str) -> str:
    return "SEQ_CLS" if kind == "bert" else "CAUSAL_LM"


def batch(kind: str, B: int = 2, L: int = 7, seed: int = 1, pad: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    if pad:
        mask[0, L - 2:] = 0  # right padding
        ids[0, L - 2:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if kind == "bert":
        out["labels"] = torch.randint(0, 3, (B,), generator=g)
    else:
        out["labels"] = ids.masked_fill(mask == 0, -100)
    return out


def output(out) -> torch.Tensor:
    return out.logits


def snapshot(model) -> dict:
    """Everything tune/load may touch: module classes, state (values), requires_grad flags,
    the attention implementation, hooks and plain attributes on modules."""
    return {
        "modules": [(n, type(m)) for n, m in model.named_modules()],
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grad_flags": [(n, p.requires_grad) for n, p in model.named_parameters()],
        "attn": model.config._attn_implementation,
        "hooks": sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()),
        "attrs": sorted((n, k) for n, m in model.named_modules() for k in vars(m) if "lora_kernels" in k),
    }


def assert_same_snapshot(a: dict, b: dict) -> None:
    for key in ("modules", "grad_flags", "attn", "hooks", "attrs"):
        assert a[key] == b[key], f"model changed: {key}"
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), f"model changed: {k}"
