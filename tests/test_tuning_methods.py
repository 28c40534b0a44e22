"""The four tuning methods on GPT-2, LLaMA (GQA) and BERT built from tiny random configs:
which parameters train, that training works, save/load, generate, merge, checkpointing."""

import copy

import pytest
import torch
from tuning_models import (
    DECODERS,
    KINDS,
    batch,
    make_model,
    one_thread,  # noqa: F401  (autouse fixture)
    task_type,
)

import lora_kernels as lk
from lora_kernels.integrations.transformers import PREFIX_ATTR

METHODS = ["lora", "prefix", "prompt", "full"]


def config_for(method, kind, **kw):
    tt = task_type(kind)
    if method == "lora":
        return lk.LoraConfig(r=4, lora_alpha=8, task_type=tt, **kw)
    if method == "prefix":
        return lk.PrefixTuningConfig(num_virtual_tokens=3, task_type=tt, **kw)
    if method == "prompt":
        return lk.PromptTuningConfig(num_virtual_tokens=3, task_type=tt, **kw)
    return lk.FullFineTuningConfig(task_type=tt, **kw)


def expected_trainable(method, kind, name):
    """Is parameter ``name`` (of the TunedModel) meant to train under ``method``?"""
    # SEQ_CLS: the task head trains too (the classifier and BERT's pooler)
    head = kind == "bert" and (".classifier." in name or ".bert.pooler." in name)
    if method == "full":
        return True
    if method == "lora":
        return name.endswith(".lora_A") or name.endswith(".lora_B") or head
    encoder = "prefix_encoder." if method == "prefix" else "prompt_encoder."
    return name.startswith(encoder) or head


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_only_intended_parameters_get_gradients(kind, method):
    kw = {"init_lora_weights": False} if method == "lora" else {}  # B = 0 would give A no gradient
    tuned = lk.tune(make_model(kind), config_for(method, kind, **kw))
    tuned.train()
    tuned(**batch(kind)).loss.backward()
    for name, p in tuned.named_parameters():
        if expected_trainable(method, kind, name):
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_loss_falls_on_a_memorisation_task(kind, method):
    # init_range 0.2: a frozen random model with std-0.02 weights is too flat to steer in 30 steps
    kw = {"target_modules": "all-linear"} if method == "lora" else {}
    tuned = lk.tune(make_model(kind, init_range=0.2), config_for(method, kind, **kw))
    tuned.train()
    data = batch(kind, B=4, L=6, seed=3)
    lr = {"lora": 3e-2, "prefix": 1e-1, "prompt": 1e-1, "full": 3e-3}[method]
    opt = torch.optim.Adam([p for p in tuned.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(30):
        loss = tuned(**data).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_save_then_load_gives_identical_logits(kind, method, tmp_path):
    cfg = config_for(method, kind, **({"init_lora_weights": False} if method == "lora" else {}))
    tuned = lk.tune(make_model(kind), cfg)
    with torch.no_grad():
        for p in tuned.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    inputs = batch(kind, pad=True)
    inputs.pop("labels")
    expected = tuned(**inputs).logits
    tuned.save_adapter(tmp_path)
    loaded = lk.load_adapter(make_model(kind), tmp_path)
    assert torch.equal(loaded(**inputs).logits, expected)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = lk.load_adapter(make_model(kind), tmp_path, is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


def test_bin_weights_only_on_request(tmp_path):
    tuned = lk.tune(make_model("gpt2"), config_for("lora", "gpt2", init_lora_weights=False))
    tuned.save_adapter(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").exists()
    with pytest.raises(ValueError, match="allow_bin=True"):
        lk.load_adapter(make_model("gpt2"), tmp_path)
    ids = batch("gpt2")["input_ids"]
    loaded = lk.load_adapter(make_model("gpt2"), tmp_path, allow_bin=True)
    assert torch.equal(loaded(input_ids=ids).logits, tuned(input_ids=ids).logits)


def _manual_greedy(tuned, ids, steps):
    for _ in range(steps):
        nxt = tuned(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    return ids


@pytest.mark.parametrize("method", ["prefix", "prompt"])
@pytest.mark.parametrize("kind", DECODERS)
def test_greedy_generate_equals_manual_greedy_loop(kind, method):
    tuned = lk.tune(make_model(kind), config_for(method, kind))
    with torch.no_grad():
        for p in tuned.parameters():
            if p.requires_grad:
                p.normal_(0, 1.0)
    ids = batch(kind, B=2, L=5)["input_ids"]
    expected = _manual_greedy(tuned, ids, 6)
    got = tuned.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                         do_sample=False, min_new_tokens=6)
    assert torch.equal(got, expected)


def _enable_checkpointing(tuned, reentrant):
    """transformers' checkpointing switch: ``activation_checkpointing_enable`` since 5.23,
    ``gradient_checkpointing_enable`` before (the GPU machine has 5.17)."""
    kwargs = {"use_reentrant": reentrant}
    if hasattr(tuned.base_model, "activation_checkpointing_enable"):
        tuned.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        assert tuned.base_model.is_activation_checkpointing
    else:
        tuned.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        assert tuned.base_model.is_gradient_checkpointing


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_prefix_tuning_with_gradient_checkpointing(kind, reentrant):
    """Same loss and prefix gradient with and without checkpointing (PEFT cannot do this)."""
    grads = []
    for checkpointing in (False, True):
        tuned = lk.tune(make_model(kind), config_for("prefix", kind, prefix_projection=True,
                                                    encoder_hidden_size=16))
        tuned.train()
        if checkpointing:
            _enable_checkpointing(tuned, reentrant)
        loss = tuned(**batch(kind)).loss
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in tuned.prefix_encoder.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_full_fine_tuning_with_gradient_checkpointing(kind):
    grads = []
    for checkpointing in (False, True):
        tuned = lk.tune(make_model(kind), config_for("full", kind, gradient_checkpointing=checkpointing))
        tuned.train()
        tuned(**batch(kind)).loss.backward()
        grads.append({n: p.grad for n, p in tuned.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == len(list(tuned.parameters()))
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name])


def test_bert_prefix_equals_prefix_in_the_cache():
    """BERT (encoder, non-causal): our prefix equals feeding the same keys/values through a
    DynamicCache with an extended mask (what PEFT did before transformers 5), positions from P."""
    from transformers import DynamicCache

    model = make_model("bert")
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("eager")
    tuned = lk.tune(model, config_for("prefix", "bert"))
    with torch.no_grad():
        tuned.prefix_encoder.embedding.weight.normal_()
    inputs = batch("bert", pad=True)
    ours = tuned(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    cache = DynamicCache(config=reference.config)
    for layer in range(2):
        k, v = tuned.prefix_encoder.layer_prefix(layer)
        cache.update(k.detach().expand(2, -1, -1, -1), v.detach().expand(2, -1, -1, -1), layer)
    mask = torch.cat([torch.ones(2, 3, dtype=torch.long), inputs["attention_mask"]], 1)
    theirs = reference(input_ids=inputs["input_ids"], attention_mask=mask, past_key_values=cache).logits
    plain = reference(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    assert (plain - theirs).abs().max() > 1e-3  # the prefix matters
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_and_unload_equals_unmerged_and_restores_keys(kind):
    model = make_model(kind)
    keys = list(model.state_dict())
    classes = [type(m) for m in model.modules()]
    tuned = lk.tune(model, config_for("lora", kind, init_lora_weights=False, bias="lora_only"))
    inputs = batch(kind)
    inputs.pop("labels")
    expected = tuned(**inputs).logits
    tuned.merge_adapter()
    torch.testing.assert_close(tuned(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
    tuned.unmerge_adapter()
    torch.testing.assert_close(tuned(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
    merged = tuned.merge_and_unload()
    assert merged is model
    assert list(merged.state_dict()) == keys
    assert [type(m) for m in merged.modules()] == classes
    torch.testing.assert_close(merged(**inputs).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_unload_restores_the_model(kind, method):
    from tuning_models import assert_same_snapshot, snapshot

    model = make_model(kind)
    before = snapshot(model)
    tuned = lk.tune(model, config_for(method, kind))
    tuned.train()
    tuned.unload()
    model.eval()
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize("kind", KINDS)
def test_lora_options(kind):
    model = make_model(kind)
    cfg = lk.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", use_rslora=True,
                        layers_to_transform=[1], bias="all", init_lora_weights="gaussian",
                        task_type=task_type(kind))
    tuned = lk.tune(model, cfg)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, lk.LoRALinear)}
    assert layers and all(".1." in n for n in layers)
    head = model.get_output_embeddings() if kind != "bert" else model.classifier
    assert not isinstance(head, lk.LoRALinear)
    for layer in layers.values():
        assert layer.scaling == pytest.approx(4 / 2 ** 0.5)
        assert torch.all(layer.lora_B == 0) and layer.lora_A.std() < 1.0
    biases = [n for n, p in tuned.named_parameters() if p.requires_grad and n.endswith("bias")]
    all_biases = [n for n, _ in model.named_parameters() if n.endswith("bias")]
    assert len(biases) == len(all_biases) and (biases or kind == "llama")  # LLaMA has no biases


def test_lora_regex_targets_and_modules_to_save():
    model = make_model("llama")
    tuned = lk.tune(model, lk.LoraConfig(r=2, target_modules=r".*\.0\.self_attn\.(q|k)_proj",
                                         modules_to_save=["lm_head"]))
    names = sorted(n for n, m in model.named_modules() if isinstance(m, lk.LoRALinear))
    assert names == ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.q_proj"]
    assert all(p.requires_grad for p in model.lm_head.parameters())
    original = tuned.modules_to_save["lm_head"]
    assert original is not model.lm_head and not original.weight.requires_grad


def test_prompt_template_and_verbalizer():
    """Classification with a language-model head: the template wraps the text; the verbalizer
    logits are the next-token logits of each label word after the last real token."""
    class Tok:
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [3 + (sum(map(ord, w)) % 90) for w in text.split()]}

    cfg = lk.PromptTuningConfig(num_virtual_tokens=4, prompt_template="Review: {input} Sentiment:",
                                verbalizer={"neg": "bad", "pos": "good"}, tokenizer=Tok(),
                                task_type="CAUSAL_LM")
    tuned = lk.tune(make_model("gpt2", init_range=0.2), cfg)
    assert tuned.format_prompt("fine film") == "Review: fine film Sentiment:"
    words = tuned.verbalizer_token_ids()
    assert words == [Tok()(" bad")["input_ids"][0], Tok()(" good")["input_ids"][0]]
    ids = torch.tensor([Tok()(tuned.format_prompt("fine film"))["input_ids"],
                        Tok()(tuned.format_prompt("dull"))["input_ids"] + [0]])
    mask = torch.ones_like(ids)
    mask[1, -1] = 0  # right padding
    got = tuned.verbalizer_logits(ids, mask)
    logits = tuned(input_ids=ids, attention_mask=mask).logits  # (B, P + L, V)
    torch.testing.assert_close(got[0], logits[0, 4 + 3, words])
    torch.testing.assert_close(got[1], logits[1, 4 + 2, words])
    left = torch.cat([ids[1:, -1:], ids[1:, :-1]], 1)  # the same row, left-padded
    left_mask = mask[1:].flip(1)
    got_left = tuned.verbalizer_logits(left, left_mask)
    torch.testing.assert_close(got_left[0], tuned(input_ids=left, attention_mask=left_mask).logits[0, -1, words])
    labels = torch.tensor([1, 0])
    opt = torch.optim.Adam(tuned.prompt_encoder.parameters(), lr=0.1)
    first = None
    for _ in range(20):
        loss = torch.nn.functional.cross_entropy(tuned.verbalizer_logits(ids, mask), labels)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first


def test_prompt_tuning_init_text_and_sample_vocab():
    class Tok:
        def __call__(self, text, **kw):
            return {"input_ids": [5, 6]}

    model = make_model("gpt2")
    emb = model.get_input_embeddings().weight
    tuned = lk.tune(model, lk.PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="TEXT",
                                                 prompt_tuning_init_text="x y", tokenizer=Tok()))
    torch.testing.assert_close(tuned.prompt_encoder.embedding.weight, emb[[5, 6, 5]])
    tuned.unload()
    tuned = lk.tune(model, lk.PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="SAMPLE_VOCAB"))
    rows = tuned.prompt_encoder.embedding.weight
    assert all(any(torch.equal(r, e) for e in emb) for r in rows)


def test_prefix_attribute_is_not_a_submodule_and_print(capsys):
    model = make_model("llama")
    keys = set(model.state_dict())
    tuned = lk.tune(model, config_for("prefix", "llama"))
    assert set(model.state_dict()) == keys
    attn = model.model.layers[1].self_attn
    k, v = getattr(attn, PREFIX_ATTR)()
    assert k.shape == (2, 3, 8) and v.shape == (2, 3, 8)  # (Hkv, P, D): prefix per kv head
    tuned.print_trainable_parameters()
    assert "trainable params: 192 " in capsys.readouterr().out  # 2 layers * (k, v) * 2 heads * 8 * 3


def test_fused_attention_opt_out_and_layers_pattern():
    model = make_model("llama")
    tuned = lk.tune(model, lk.LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=0,
                                         layers_pattern="layers"), fused_attention=False)
    assert model.config._attn_implementation == "sdpa"
    assert [n for n, m in model.named_modules() if isinstance(m, lk.LoRALinear)] == ["model.layers.0.self_attn.q_proj"]
    tuned.unload()
    tuned = lk.tune(model, lk.LoraConfig(r=2, target_modules=["q_proj"]))
    assert model.config._attn_implementation == "lora_kernels"
    tuned.unload()
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("method", ["lora", "prefix", "prompt"])
@pytest.mark.parametrize("kind", DECODERS)
def test_disable_adapter_gives_the_base_model(kind, method):
    model = make_model(kind)
    ids = batch(kind)["input_ids"]
    base = model(input_ids=ids).logits
    tuned = lk.tune(model, config_for(method, kind, **({"init_lora_weights": False} if method == "lora" else {})))
    with torch.no_grad():
        for p in tuned.parameters():
            if p.requires_grad:
                p.normal_()
    tuned_logits = tuned(input_ids=ids).logits
    with tuned.disable_adapter():
        torch.testing.assert_close(tuned(input_ids=ids).logits, base, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tuned(input_ids=ids).logits, tuned_logits)
    assert (tuned_logits[:, -ids.shape[1]:] - base).abs().max() > 1e-3


def test_forward_signature_is_the_wrapped_models():
    """transformers' Trainer keeps the dataset columns named in the forward's signature."""
    import inspect

    tuned = lk.tune(make_model("gpt2"), config_for("prompt", "gpt2"))
    params = inspect.signature(tuned.forward).parameters
    assert {"input_ids", "attention_mask", "labels"} <= set(params)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_a_deep_copy_runs_its_own_adapter(method):
    tuned = lk.tune(make_model("gpt2"), config_for(method, "gpt2"))
    clone = copy.deepcopy(tuned)
    encoder = clone.prompt_encoder if method == "prompt" else clone.prefix_encoder
    with torch.no_grad():
        encoder.embedding.weight.add_(1.0)
    ids = batch("gpt2")["input_ids"]
    assert not torch.equal(clone(input_ids=ids).logits, tuned(input_ids=ids).logits)
    with clone.disable_adapter():  # the copy's switches act on the copy
        plain = clone(input_ids=ids).logits
    with tuned.disable_adapter():
        torch.testing.assert_close(plain, tuned(input_ids=ids).logits)
    with pytest.raises(RuntimeError, match="is a copy"):
        clone.unload()
