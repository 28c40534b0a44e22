"""The task head a method trains for sequence classification: the classifier and the pooler
feeding it (BERT's ``pooler``), for LoRA, prefix and prompt tuning; ``train_pooler=False`` opts
out; "all-linear" leaves both to modules_to_save; the saved adapter loads in PEFT."""

import copy
import json

import pytest
import torch
from tuning_models import (
    batch,
    make_model,
    one_thread,  # noqa: F401  (autouse fixture)
)

import lora_kernels as lk
from lora_kernels.integrations.model_families import classifier_pooler

METHOD_CONFIGS = {
    "lora": lambda **kw: lk.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                       init_lora_weights=False, **kw),
    "prefix": lambda **kw: lk.PrefixTuningConfig(num_virtual_tokens=3, **kw),
    "prompt": lambda **kw: lk.PromptTuningConfig(num_virtual_tokens=3, **kw),
}


def _is_adapter(method, name):
    if method == "lora":
        return name.endswith(".lora_A") or name.endswith(".lora_B")
    return name.startswith(f"{method}_encoder.")


@pytest.mark.parametrize("train_pooler", [True, False])
@pytest.mark.parametrize("method", sorted(METHOD_CONFIGS))
def test_seq_cls_trains_the_classifier_and_its_pooler(method, train_pooler):
    tuned = lk.tune(make_model("bert"), METHOD_CONFIGS[method](task_type="SEQ_CLS", train_pooler=train_pooler))
    tuned.train()
    tuned(**batch("bert")).loss.backward()
    head = ("base_model.classifier.", "base_model.bert.pooler.") if train_pooler else ("base_model.classifier.",)
    trained = {n for n, p in tuned.named_parameters() if p.requires_grad}
    expected = {n for n, _ in tuned.named_parameters() if _is_adapter(method, n) or n.startswith(head)}
    assert trained == expected
    assert any(n.startswith("base_model.bert.pooler.") for n in trained) == train_pooler
    for n, p in tuned.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_all_linear_leaves_the_classifier_and_pooler_to_modules_to_save():
    model = make_model("bert")
    lk.tune(model, lk.LoraConfig(r=2, target_modules="all-linear", task_type="SEQ_CLS"))
    adapted = [n for n, m in model.named_modules() if isinstance(m, lk.LoRALinear)]
    assert adapted and not any(n.startswith(("bert.pooler", "classifier")) for n in adapted)
    assert all(p.requires_grad for p in model.bert.pooler.parameters())
    model = make_model("bert")  # opted out: the pooler stays frozen and is not adapted either
    lk.tune(model, lk.LoraConfig(r=2, target_modules="all-linear", task_type="SEQ_CLS", train_pooler=False))
    assert not any(isinstance(m, lk.LoRALinear) for m in model.bert.pooler.modules())
    assert not any(p.requires_grad for p in model.bert.pooler.parameters())


def test_train_pooler_is_checked():
    with pytest.raises(TypeError, match="train_pooler"):
        lk.LoraConfig(train_pooler="yes")


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_saved_adapter_with_the_pooler_loads_in_peft(method, tmp_path):
    peft = pytest.importorskip("peft")
    model = make_model("bert")
    reference = copy.deepcopy(model)
    tuned = lk.tune(model, METHOD_CONFIGS[method](task_type="SEQ_CLS"))
    with torch.no_grad():
        for p in tuned.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    tuned.eval().save_adapter(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "bert.pooler" in data["modules_to_save"] and "train_pooler" not in data
    inputs = {k: v for k, v in batch("bert").items() if k != "labels"}
    theirs = peft.PeftModel.from_pretrained(reference, str(tmp_path)).eval()
    assert any("pooler" in n for n, _ in theirs.named_parameters() if "modules_to_save" in n)
    torch.testing.assert_close(tuned(**inputs).logits, theirs(**inputs).logits, rtol=1e-5, atol=1e-5)
    # and back here: the same modules train, no pooler beyond what the file holds
    loaded = lk.load_adapter(make_model("bert"), tmp_path, is_trainable=True)
    assert sorted(loaded.modules_to_save) == ["bert.pooler", "classifier"]
    torch.testing.assert_close(loaded(**inputs).logits, theirs(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_a_peft_adapter_loads_with_peft_trainable_set(tmp_path):
    """A PEFT SEQ_CLS adapter names only the classifier: loading it here trains just that."""
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(make_model("bert"), peft.LoraConfig(r=2, target_modules=["query"],
                                                                     task_type="SEQ_CLS"))
    theirs.save_pretrained(str(tmp_path))
    loaded = lk.load_adapter(make_model("bert"), tmp_path, is_trainable=True)
    assert sorted(loaded.modules_to_save) == ["classifier"]
    assert not any(p.requires_grad for p in loaded.base_model.bert.pooler.parameters())


def _tiny(family):
    import transformers as tf

    common = dict(vocab_size=50, num_labels=2, pad_token_id=0)
    if family == "distilbert":
        cfg = tf.DistilBertConfig(dim=16, n_layers=1, n_heads=2, hidden_dim=32, **common)
    else:
        cfg = tf.AutoConfig.for_model(family, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32, **common)
    return tf.AutoModelForSequenceClassification.from_config(cfg)


@pytest.mark.parametrize("family, pooler", [("bert", "bert.pooler"), ("distilbert", "pre_classifier"),
                                            ("deberta-v2", "pooler"), ("roberta", None)])
def test_pooler_per_family(family, pooler):
    model = _tiny(family)
    assert classifier_pooler(model) == pooler
    tuned = lk.tune(model, lk.PromptTuningConfig(num_virtual_tokens=2, task_type="SEQ_CLS"))
    assert (pooler in tuned.modules_to_save) if pooler else all(
        n in ("classifier", "score") for n in tuned.modules_to_save)
