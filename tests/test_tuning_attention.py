"""Our attention inside transformers: equal to eager attention on GPT-2, LLaMA (GQA) and BERT,
with and without padding, during generate with a cache; masks that are not causal + key
padding go to the reference path; unsupported models get an error saying why."""

import types

import pytest
import torch
from tuning_models import (
    DECODERS,
    KINDS,
    make_model,
    one_thread,  # noqa: F401  (autouse fixture)
)

import lora_kernels as lk
from lora_kernels.integrations import transformers as hf


def _inputs(kind, pad_side):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 100, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    if pad_side == "left":
        mask[0, :3] = 0
    elif pad_side == "right":
        mask[1, -4:] = 0
    return ids, mask


@pytest.mark.parametrize("pad_side", [None, "left", "right"])
@pytest.mark.parametrize("kind", KINDS)
def test_fused_attention_equals_eager(kind, pad_side, monkeypatch):
    calls = []
    real = hf.prefix_attention
    monkeypatch.setattr(hf, "prefix_attention", lambda *a, **k: calls.append(k["causal"]) or real(*a, **k))
    eager = make_model(kind, attn="eager")
    ours = lk.enable_fused_attention(make_model(kind, attn="eager"))
    assert ours.config._attn_implementation == hf.ATTENTION_NAME
    ids, mask = _inputs(kind, pad_side)
    keep = mask.bool() if kind != "bert" else slice(None)
    a = eager(input_ids=ids, attention_mask=mask).logits
    b = ours(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(b[keep], a[keep], rtol=1e-5, atol=1e-5)
    assert calls == [kind != "bert"] * 2  # both layers on the fused op, causal for decoders


@pytest.mark.parametrize("kind", DECODERS)
def test_generate_with_cache_and_left_padding_equals_eager(kind):
    eager = make_model(kind, attn="eager", init_range=0.2)
    ours = lk.enable_fused_attention(make_model(kind, attn="eager", init_range=0.2))
    ids, mask = _inputs(kind, "left")
    kw = dict(attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(ours.generate(ids, **kw), eager.generate(ids, **kw))


def _module(is_causal=True):
    return types.SimpleNamespace(is_causal=is_causal, training=False)


def _reference(q, k, v, keep, scale, pk=None, pv=None):
    B, Hq = q.shape[:2]
    if pk is not None:
        k = torch.cat([pk.expand(B, -1, -1, -1), k], 2)
        v = torch.cat([pv.expand(B, -1, -1, -1), v], 2)
        keep = torch.cat([keep.new_ones(*keep.shape[:-1], pk.shape[-2]), keep], -1)
    k = k.double().repeat_interleave(Hq // k.shape[1], 1)
    v = v.double().repeat_interleave(Hq // v.shape[1], 1)
    s = (q.double() @ k.transpose(-1, -2)) * scale
    p = torch.softmax(s.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0)
    return (p @ v).transpose(1, 2)


def _qkv(B=2, Hq=4, Hkv=2, Lq=5, Lk=5, D=8, P=0):
    q, k, v = torch.randn(B, Hq, Lq, D), torch.randn(B, Hkv, Lk, D), torch.randn(B, Hkv, Lk, D)
    pk, pv = (torch.randn(Hkv, P, D), torch.randn(Hkv, P, D)) if P else (None, None)
    return q, k, v, pk, pv


@pytest.mark.parametrize("P", [0, 3])
@pytest.mark.parametrize("mask_kind", ["none_causal", "none_decode", "causal_pad", "window", "random", "alibi"])
def test_mask_forms(mask_kind, P, monkeypatch):
    """Each mask transformers may hand us: None (causality from module.is_causal, bottom-right,
    also when Lk > Lq as in decoding), causal + padding (fused), and masks that are not
    causal + key padding (sliding window, arbitrary, additive biases): reference path."""
    calls = []
    real = hf.prefix_attention
    monkeypatch.setattr(hf, "prefix_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    Lq, Lk = (2, 6) if mask_kind == "none_decode" else (6, 6)
    q, k, v, pk, pv = _qkv(Lq=Lq, Lk=Lk, P=P)
    module = _module()
    if P:
        module.lora_kernels_prefix = lambda: (pk, pv)
    tril = torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq)
    mask, keep = None, tril.expand(2, 1, Lq, Lk)
    if mask_kind == "causal_pad":
        kpm = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6], dtype=torch.bool)
        keep = tril & kpm[:, None, None, :]
        mask = keep
    elif mask_kind == "window":
        keep = (tril & ~torch.ones(Lq, Lk, dtype=torch.bool).tril(-3)).expand(2, 1, Lq, Lk)
        mask = keep
    elif mask_kind == "random":
        keep = torch.rand(2, 1, Lq, Lk) > 0.4
        mask = keep
    elif mask_kind == "alibi":
        mask = -0.5 * torch.arange(Lk).float().expand(2, 1, Lq, Lk).clone()
        mask = mask.masked_fill(~tril, torch.finfo(torch.float32).min)
    scale = 8 ** -0.5
    out, weights = hf.lora_kernels_attention(module, q, k, v, mask, scaling=scale)
    assert weights is None and out.shape == (2, Lq, 4, 8)
    if mask_kind == "alibi":
        kk = torch.cat([pk.expand(2, -1, -1, -1), k], 2) if P else k
        vv = torch.cat([pv.expand(2, -1, -1, -1), v], 2) if P else v
        bias = torch.cat([torch.zeros(2, 1, Lq, P), mask], -1) if P else mask
        s = q.double() @ kk.double().repeat_interleave(2, 1).transpose(-1, -2) * scale + bias.double()
        expected = (torch.softmax(s, -1) @ vv.double().repeat_interleave(2, 1)).transpose(1, 2)
    else:
        expected = _reference(q, k, v, keep, scale, pk, pv)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    fused = mask_kind in ("none_causal", "none_decode", "causal_pad")
    assert bool(calls) == fused


def test_bidirectional_padding_is_fused_non_causal(monkeypatch):
    calls = []
    real = hf.prefix_attention
    monkeypatch.setattr(hf, "prefix_attention", lambda *a, **k: calls.append(k) or real(*a, **k))
    q, k, v, _, _ = _qkv()
    kpm = torch.tensor([[1, 1, 1, 0, 0], [1] * 5], dtype=torch.bool)
    keep = kpm[:, None, None, :].expand(2, 1, 5, 5)
    out, _ = hf.lora_kernels_attention(_module(is_causal=False), q, k, v, keep, scaling=0.3)
    torch.testing.assert_close(out.double(), _reference(q, k, v, keep, 0.3), rtol=1e-5, atol=1e-5)
    assert calls[0]["causal"] is False and torch.equal(calls[0]["key_padding_mask"], kpm)


def test_unsupported_model_gets_an_error_saying_why():
    import transformers as tf
    from tuning_models import assert_same_snapshot, snapshot

    model = tf.BloomForCausalLM(tf.BloomConfig(n_layer=2, hidden_size=32, n_head=4, vocab_size=100))
    before = snapshot(model)
    with pytest.raises(ValueError, match="AttentionInterface"):
        lk.enable_fused_attention(model)
    with pytest.raises(ValueError, match="AttentionInterface"):
        lk.tune(model, lk.PrefixTuningConfig(num_virtual_tokens=2))
    assert_same_snapshot(before, snapshot(model))
    with pytest.warns(UserWarning, match="fused attention not enabled"):
        tuned = lk.tune(model, lk.LoraConfig(r=2, target_modules=["query_key_value"]))
    tuned.unload()
    assert_same_snapshot(before, snapshot(model))


def _other_family(name):
    import transformers as tf

    torch.manual_seed(0)
    if name == "mistral":  # sliding window: the mask is not causal + padding -> reference path
        return tf.MistralForCausalLM(tf.MistralConfig(
            num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, vocab_size=100, sliding_window=4)).eval()
    if name == "gemma2":  # softcap
        return tf.Gemma2ForCausalLM(tf.Gemma2Config(
            num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, vocab_size=100, head_dim=8, sliding_window=4)).eval()
    return tf.T5ForConditionalGeneration(tf.T5Config(  # position_bias, scaling 1
        num_layers=2, d_model=32, num_heads=4, d_kv=8, d_ff=64, vocab_size=100,
        decoder_start_token_id=0)).eval()


@pytest.mark.parametrize("name", ["mistral", "gemma2", "t5"])
def test_other_families_equal_eager(name):
    """No table entry needed; what the fused op cannot express takes the reference path."""
    eager = _other_family(name)
    eager.set_attn_implementation("eager")
    ours = lk.enable_fused_attention(_other_family(name))
    ids, mask = _inputs(name, "left")
    kw = {"input_ids": ids, "attention_mask": mask}
    if name == "t5":
        kw["decoder_input_ids"] = ids[:, :4]
    keep = mask.bool() if name != "t5" else slice(None)
    torch.testing.assert_close(ours(**kw).logits[keep], eager(**kw).logits[keep], rtol=1e-5, atol=1e-5)


def test_reference_extras_softcap_sinks_position_bias():
    q, k, v, pk, pv = _qkv(P=2)
    module = _module(is_causal=True)
    module.lora_kernels_prefix = lambda: (pk, pv)
    bias = torch.randn(1, 4, 5, 5)
    sinks = torch.randn(4)
    out, _ = hf.lora_kernels_attention(module, q, k, v, None, scaling=0.3, softcap=2.0,
                                       position_bias=bias, s_aux=sinks)
    kk = torch.cat([pk.expand(2, -1, -1, -1), k], 2).double().repeat_interleave(2, 1)
    vv = torch.cat([pv.expand(2, -1, -1, -1), v], 2).double().repeat_interleave(2, 1)
    s = torch.tanh(q.double() @ kk.transpose(-1, -2) * 0.3 / 2.0) * 2.0
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    seq_bias = bias.double().masked_fill(~causal, float("-inf"))
    s = s + torch.cat([torch.zeros(1, 4, 5, 2, dtype=torch.float64), seq_bias], -1)
    s = torch.cat([s, sinks.double().view(1, 4, 1, 1).expand(2, 4, 5, 1)], -1)
    expected = (torch.softmax(s, -1)[..., :-1] @ vv).transpose(1, 2)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_mask_longer_than_keys_is_an_error():
    q, k, v, _, _ = _qkv()
    with pytest.raises(ValueError, match="mask covers 8 keys but the layer has 5"):
        hf.lora_kernels_attention(_module(), q, k, v, torch.ones(2, 1, 5, 8, dtype=torch.bool))
