"""task_type inferred from the model class at ``tune`` time and written with the adapter, so
PEFT loads a prefix- or prompt-tuning adapter saved without one as the right PeftModel class
(a bare PeftModel would silently ignore the virtual tokens)."""

import copy
import json

import pytest
import torch
from torch import nn
from tuning_models import (
    batch,
    make_model,
    one_thread,  # noqa: F401  (autouse fixture)
)

import lora_kernels as lk
from lora_kernels.integrations.model_families import infer_task_type


@pytest.mark.parametrize("kind, method", [("gpt2", "prefix"), ("gpt2", "prompt"), ("llama", "prompt"),
                                          ("bert", "prompt")])
def test_adapter_saved_without_task_type_loads_in_peft_with_the_same_logits(kind, method, tmp_path):
    peft = pytest.importorskip("peft")
    model = make_model(kind)
    reference = copy.deepcopy(model)
    config = (lk.PrefixTuningConfig if method == "prefix" else lk.PromptTuningConfig)(num_virtual_tokens=3)
    assert config.task_type is None
    tuned = lk.tune(model, config)
    with torch.no_grad():
        for p in tuned.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    tuned.save_adapter(tmp_path)
    expected = "SEQ_CLS" if kind == "bert" else "CAUSAL_LM"
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] == expected
    theirs = peft.PeftModel.from_pretrained(reference, str(tmp_path)).eval()
    assert type(theirs).__name__ == {"SEQ_CLS": "PeftModelForSequenceClassification",
                                     "CAUSAL_LM": "PeftModelForCausalLM"}[expected]
    inputs = batch(kind)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    ours, peft_out = tuned(input_ids=ids, attention_mask=mask).logits, theirs(input_ids=ids, attention_mask=mask).logits
    if kind != "bert":
        ours, peft_out = ours[:, -ids.shape[1]:], peft_out[:, -ids.shape[1]:]
    torch.testing.assert_close(ours, peft_out, rtol=1e-5, atol=1e-5)


def test_an_explicit_task_type_is_kept():
    tuned = lk.tune(make_model("gpt2"), lk.PromptTuningConfig(num_virtual_tokens=2, task_type="FEATURE_EXTRACTION"))
    assert tuned.peft_config.task_type == "FEATURE_EXTRACTION"


def test_inferred_from_the_class():
    import transformers as tf

    bert = tf.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)
    t5 = tf.T5Config(vocab_size=30, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    cases = [(tf.BertForSequenceClassification(bert), "SEQ_CLS"),
             (tf.BertForTokenClassification(bert), "TOKEN_CLS"),
             (tf.BertForQuestionAnswering(bert), "QUESTION_ANS"),
             (tf.BertModel(bert), "FEATURE_EXTRACTION"),
             (tf.BertForMaskedLM(bert), None),
             (tf.T5ForConditionalGeneration(t5), "SEQ_2_SEQ_LM"),
             (make_model("gpt2"), "CAUSAL_LM"), (make_model("llama"), "CAUSAL_LM")]
    for model, task in cases:
        assert infer_task_type(model) == task, type(model).__name__

    class MyCustomForCausalLM(nn.Module):  # a class outside transformers' mappings: by its name
        pass

    assert infer_task_type(MyCustomForCausalLM()) == "CAUSAL_LM"
