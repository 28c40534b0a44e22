"""PEFT interop: an adapter saved here loads in PEFT with the same logits, and one saved by
PEFT loads here with the same logits (GPT-2, LLaMA with GQA, BERT; dropout 0)."""

import copy
import json

import pytest
import torch
from tuning_models import (
    KINDS,
    batch,
    make_model,
    one_thread,  # noqa: F401  (autouse fixture)
    task_type,
)

import lora_kernels as lk

peft = pytest.importorskip("peft")

METHODS = ["lora", "prefix", "prompt"]


def ours_config(method, kind):
    tt = task_type(kind)
    if method == "lora":
        return lk.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, task_type=tt)
    if method == "prefix":
        return lk.PrefixTuningConfig(num_virtual_tokens=3, task_type=tt)
    return lk.PromptTuningConfig(num_virtual_tokens=3, task_type=tt)


def peft_config(method, kind):
    tt = task_type(kind)
    if method == "lora":
        targets = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"], "bert": ["query", "value"]}[kind]
        return peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, task_type=tt)
    if method == "prefix":
        return peft.PrefixTuningConfig(num_virtual_tokens=3, task_type=tt)
    return peft.PromptTuningConfig(num_virtual_tokens=3, task_type=tt)


def _skip_peft_bert_prefix(kind, method):
    if kind == "bert" and method == "prefix":
        pytest.skip("PEFT 0.21 refuses prefix tuning on BERT under transformers 5.x ('Model does not "
                    "support past key values'); test_tuning_methods checks BERT prefix against a "
                    "cache-based reference instead")


def _randomise(tuned):
    """Give every trainable tensor non-trivial values (the classifier head included)."""
    with torch.no_grad():
        for p in tuned.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)


def _logits(model, inputs, kind):
    out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    if kind != "bert" and out.shape[1] != inputs["input_ids"].shape[1]:
        out = out[:, -inputs["input_ids"].shape[1]:]  # prompt tuning returns P + L positions
    return out


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_ours_to_peft(kind, method, tmp_path):
    _skip_peft_bert_prefix(kind, method)
    model = make_model(kind)
    reference = copy.deepcopy(model)
    tuned = lk.tune(model, ours_config(method, kind))
    _randomise(tuned)
    tuned.save_adapter(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == ours_config(method, kind).peft_type and data["inference_mode"] is True
    inputs = batch(kind)
    ours = _logits(tuned, inputs, kind)
    theirs_model = peft.PeftModel.from_pretrained(reference, str(tmp_path)).eval()
    theirs = _logits(theirs_model, inputs, kind)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_peft_to_ours(kind, method, tmp_path):
    _skip_peft_bert_prefix(kind, method)
    model = make_model(kind)
    reference = copy.deepcopy(model)
    theirs_model = peft.get_peft_model(reference, peft_config(method, kind))
    _randomise(theirs_model)
    theirs_model.eval()
    theirs_model.save_pretrained(str(tmp_path))
    inputs = batch(kind)
    theirs = _logits(theirs_model, inputs, kind)
    tuned = lk.load_adapter(model, tmp_path)
    ours = _logits(tuned, inputs, kind)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_peft_prompt_adapter_with_text_init_loads_without_its_tokenizer(tmp_path):
    """PEFT records prompt_tuning_init TEXT and a tokenizer name; loading needs neither."""
    model = make_model("gpt2")
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    theirs.save_pretrained(str(tmp_path))
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    data.update(prompt_tuning_init="TEXT", prompt_tuning_init_text="hello",
                tokenizer_name_or_path="/nonexistent/tokenizer")
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    tuned = lk.load_adapter(model, tmp_path)
    assert tuned.config_tuning.prompt_tuning_init == "TEXT"
    ids = batch("gpt2")["input_ids"]
    torch.testing.assert_close(tuned(input_ids=ids).logits[:, 3:], theirs.eval()(input_ids=ids).logits[:, 3:])


@pytest.mark.parametrize("direction", ["ours_to_peft", "peft_to_ours"])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_lora_options_round_trip(kind, direction, tmp_path):
    """rsLoRA, trainable biases, layers_to_transform, exclude_modules and modules_to_save."""
    targets = {"gpt2": ["c_attn", "c_fc"], "llama": ["q_proj", "v_proj", "up_proj"]}[kind]
    common = dict(r=4, lora_alpha=16, target_modules=targets, use_rslora=True, bias="all",
                  layers_to_transform=[1], init_lora_weights=False)
    if kind == "llama":
        common.update(modules_to_save=["lm_head"], exclude_modules=["v_proj"])
    model = make_model(kind)
    reference = copy.deepcopy(model)
    inputs = batch(kind)
    if direction == "ours_to_peft":
        tuned = lk.tune(model, lk.LoraConfig(**common))
        _randomise(tuned)
        tuned.save_adapter(tmp_path)
        theirs_model = peft.PeftModel.from_pretrained(reference, str(tmp_path)).eval()
        ours = _logits(tuned, inputs, kind)
    else:
        theirs_model = peft.get_peft_model(reference, peft.LoraConfig(task_type="CAUSAL_LM", **common))
        _randomise(theirs_model)
        theirs_model.eval().save_pretrained(str(tmp_path))
        ours = _logits(lk.load_adapter(model, tmp_path), inputs, kind)
    layers = [n for n, m in (model if direction == "peft_to_ours" else tuned.base_model).named_modules()
              if isinstance(m, lk.LoRALinear)]
    assert layers and all(".1." in n and "v_proj" not in n for n in layers)
    torch.testing.assert_close(ours, _logits(theirs_model, inputs, kind), rtol=1e-5, atol=1e-5)
