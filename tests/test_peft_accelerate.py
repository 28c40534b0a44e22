"""accelerate(peft_model): PEFT's LoRA layers run on lora_linear with the same outputs and
gradients, the same state-dict keys and saved files, and can be undone."""

from __future__ import annotations

import logging

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from lora_kernels.integrations.peft import accelerate, restore  # noqa: E402


def _gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=64,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def _llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=48,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=97)
    return transformers.LlamaForCausalLM(cfg)


TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"], "llama": ["q_proj", "v_proj", "down_proj"]}


def _peft_model(family, dropout=0.0, **extra):
    base = _gpt2() if family == "gpt2" else _llama()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS[family],
                          init_lora_weights=False, **extra)
    return peft.get_peft_model(base, cfg)


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_outputs_and_grads_equal_peft(family, dtype):
    model = _peft_model(family).to(dtype)
    ids = torch.randint(0, 97, (3, 11))
    ref_logits, ref_grads = _loss_and_grads(model, ids)
    handle = accelerate(model)
    n_lora = sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in model.modules())
    assert len(handle.lora_layers) == n_lora > 0 and not handle.skipped
    logits, grads = _loss_and_grads(model, ids)
    tol = {torch.float32: 2e-5, torch.float64: 1e-10}[dtype]
    torch.testing.assert_close(logits, ref_logits, rtol=tol, atol=tol)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=10 * tol, atol=10 * tol, msg=n)


def test_calls_lora_linear(monkeypatch):
    import lora_kernels.integrations.peft as mod

    calls = []
    real = mod.lora_linear
    monkeypatch.setattr(mod, "lora_linear", lambda *a, **k: calls.append(k) or real(*a, **k))
    model = _peft_model("gpt2", dropout=0.1)
    accelerate(model)
    model(input_ids=torch.randint(0, 97, (2, 5)))
    assert len(calls) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj in 2 blocks
    assert {c["fan_in_fan_out"] for c in calls} == {True}  # GPT-2's Conv1D layout


def test_dropout_trains_and_eval_is_deterministic():
    model = _peft_model("llama", dropout=0.3)
    ids = torch.randint(0, 97, (2, 7))
    model.eval()
    ref = model(input_ids=ids).logits
    with accelerate(model):
        torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=2e-5, atol=2e-5)
        model.train()
        _, grads = _loss_and_grads(model, ids)
        assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())


def test_keys_params_and_saved_files_unchanged(tmp_path):
    model = _peft_model("gpt2")
    keys = list(model.state_dict().keys())
    params = {n: p for n, p in model.named_parameters()}
    model.save_pretrained(tmp_path / "before")
    handle = accelerate(model)
    assert list(model.state_dict().keys()) == keys
    assert {n: p for n, p in model.named_parameters()} == params  # same Parameter objects
    model.save_pretrained(tmp_path / "after")
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "before" / f).read_bytes() == (tmp_path / "after" / f).read_bytes()
    handle.restore()
    assert list(model.state_dict().keys()) == keys


def _fused(model):
    return sum(type(m).__name__ == "FusedLoraLinear" for m in model.modules())


def test_restore_and_context_manager():
    model = _peft_model("llama")
    assert not _fused(model)
    with accelerate(model) as h:
        assert _fused(model) == len(h.lora_layers) > 0
    assert not _fused(model)
    assert all(type(m) is peft.tuners.lora.Linear for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    accelerate(model)
    accelerate(model)  # twice: the first is undone first
    restore(model)
    assert not _fused(model) and not any("forward" in m.__dict__ for m in model.modules())
    restore(model)  # idempotent


def test_merged_and_disabled_follow_peft():
    model = _peft_model("gpt2")
    ids = torch.randint(0, 97, (2, 6))
    accelerate(model)
    with torch.no_grad():
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        lora = model(input_ids=ids).logits
        model.merge_adapter()
        merged = model(input_ids=ids).logits
        model.unmerge_adapter()
    assert (base - lora).abs().max() > 1e-3
    torch.testing.assert_close(merged, lora, rtol=1e-4, atol=1e-4)


def test_unsupported_left_on_peft_path_and_reported_once(caplog, monkeypatch):
    import lora_kernels.integrations.peft as mod

    model = _peft_model("llama", use_dora=True)
    ids = torch.randint(0, 97, (2, 6))
    ref = model(input_ids=ids).logits
    with caplog.at_level(logging.WARNING, logger="lora_kernels.integrations.peft"):
        handle = accelerate(model)
    assert len(handle.skipped) == 6 and all("DoRA" in r for r in handle.skipped.values())
    monkeypatch.setattr(mod, "lora_linear", lambda *a, **k: pytest.fail("DoRA ran on lora_linear"))
    warnings = [r for r in caplog.records if r.name == "lora_kernels.integrations.peft"]
    assert len(warnings) == 1 and "DoRA" in warnings[0].getMessage()
    torch.testing.assert_close(model(input_ids=ids).logits, ref)


def test_two_active_adapters_stay_on_peft():
    model = _peft_model("gpt2")
    model.add_adapter("second", peft.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    model.base_model.set_adapter(["default", "second"])
    handle = accelerate(model)
    assert any("active adapters" in r for r in handle.skipped.values())


def test_rejects_non_module():
    with pytest.raises(TypeError, match="expected a torch.nn.Module"):
        accelerate("not a model")


def _peft_prefix_model(family, P=5):
    base = _gpt2() if family == "gpt2" else _llama()
    model = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    with torch.no_grad():  # a non-trivial prefix
        for p in model.prompt_encoder.parameters():
            p.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("padded", [False, True])
def test_prefix_tuning_equals_peft(family, padded):
    model = _peft_prefix_model(family)
    ids = torch.randint(0, 97, (2, 9))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, 6:] = 0
    labels = ids.masked_fill(mask == 0, -100)

    def run():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        grad = next(p for p in model.prompt_encoder.parameters() if p.requires_grad).grad.clone()
        return out.logits.detach(), out.loss.detach(), grad

    ref_logits, ref_loss, ref_grad = run()
    keys = list(model.state_dict())
    with accelerate(model) as handle:
        assert handle.prefix and "<prefix tuning>" not in handle.skipped
        logits, loss, grad = run()
        assert list(model.state_dict()) == keys
    keep = mask.bool()
    torch.testing.assert_close(logits[keep], ref_logits[keep], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5)
    assert "forward" not in model.__dict__ and type(model) is peft.PeftModelForCausalLM  # restored
    torch.testing.assert_close(run()[0], ref_logits)


def test_prefix_with_gradient_checkpointing_runs():
    model = _peft_prefix_model("llama")
    model.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 97, (2, 7))
    with accelerate(model):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    grads = [p.grad for p in model.prompt_encoder.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_prefix_generate_stays_on_peft_path():
    model = _peft_prefix_model("gpt2")
    model.eval()
    ids = torch.randint(0, 97, (1, 5))
    ref = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with accelerate(model):
        model(input_ids=ids)  # our path first, then PEFT's generate
        out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)


def test_tensor_scaling_from_compiled_hotswap_takes_peft_path():
    """prepare_model_for_compiled_hotswap stores each scaling as a 0-dim tensor."""
    from peft.utils.hotswap import prepare_model_for_compiled_hotswap

    model = _peft_model("gpt2")
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    assert isinstance(model.base_model.model.transformer.h[0].attn.c_attn.scaling["default"], torch.Tensor)
    ids = torch.randint(0, 97, (2, 6))
    ref = model(input_ids=ids).logits
    with accelerate(model):
        torch.testing.assert_close(model(input_ids=ids).logits, ref)


def test_deepcopy_computes_with_its_own_tensors():
    import copy

    model = _peft_model("llama")
    ids = torch.randint(0, 97, (2, 6))
    accelerate(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in twin.named_parameters():
            if "lora_B" in n:
                p.mul_(3.0)
    restore(model)
    with torch.no_grad():
        expected = twin.eval()(input_ids=ids).logits  # the copy's own (tripled) adapters ...
        restore(twin)
        assert not _fused(twin)
        torch.testing.assert_close(expected, twin(input_ids=ids).logits, rtol=2e-5, atol=2e-5)
        assert (expected - model.eval()(input_ids=ids).logits).abs().max() > 1e-3  # ... not the original's


@pytest.mark.parametrize("kind", ["lora", "prefix"])
def test_pickle_and_torch_save_round_trip(kind, tmp_path):
    import io
    import pickle

    model = _peft_model("gpt2") if kind == "lora" else _peft_prefix_model("gpt2")
    model.eval()
    ids = torch.randint(0, 97, (2, 6))
    ref = model(input_ids=ids).logits
    handle = accelerate(model)
    assert handle.lora_layers if kind == "lora" else handle.prefix
    model(input_ids=ids)  # a forward first: state from it must not get in the way
    clone = pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(clone(input_ids=ids).logits, ref, rtol=2e-5, atol=2e-5)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(input_ids=ids).logits, ref, rtol=2e-5, atol=2e-5)
    assert type(loaded).__name__.startswith("PrefixAccelerated") if kind == "prefix" else _fused(loaded)


def test_a_layer_without_the_active_adapter_is_decided_per_call(monkeypatch):
    """c_fc has only the second adapter: when it becomes active, c_fc moves onto lora_linear."""
    import lora_kernels.integrations.peft as mod

    model = _peft_model("gpt2")  # "default" on c_attn, c_proj, c_fc
    model.add_adapter("other", peft.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    ids = torch.randint(0, 97, (2, 6))
    model.set_adapter("other")  # c_proj and c_fc have no "other"
    handle = accelerate(model)
    assert any("0 active adapters" in r for r in handle.skipped.values())
    model.set_adapter("default")
    with torch.no_grad():
        calls = []
        real = mod.lora_linear
        monkeypatch.setattr(mod, "lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
        fused = model(input_ids=ids).logits
        assert len(calls) == 8  # every layer of "default", including those skipped at accelerate time
        restore(model)
        torch.testing.assert_close(fused, model(input_ids=ids).logits, rtol=2e-5, atol=2e-5)
