"""Full fine-tuning has no adapter: ``save_adapter`` writes a transformers model folder that
``AutoModel*.from_pretrained`` and ``load_adapter`` both read (tied weights stored once)."""

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


def _trained(kind):
    tuned = lk.tune(make_model(kind), lk.FullFineTuningConfig(frozen_modules=["wpe"] if kind == "gpt2" else None))
    with torch.no_grad():
        for p in tuned.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return tuned.eval()


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_saved_as_a_transformers_model_folder(kind, tmp_path):
    import transformers as tf

    tuned = _trained(kind)
    tuned.save_adapter(tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()
    assert not (tmp_path / "adapter_config.json").exists()  # nothing PEFT would misread
    inputs = {k: v for k, v in batch(kind).items() if k != "labels"}
    auto = tf.AutoModelForCausalLM if kind == "gpt2" else tf.AutoModelForSequenceClassification
    reloaded = auto.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(**inputs).logits, tuned(**inputs).logits, rtol=1e-6, atol=1e-6)
    loaded = lk.load_adapter(make_model(kind), tmp_path)
    torch.testing.assert_close(loaded(**inputs).logits, tuned(**inputs).logits, rtol=1e-6, atol=1e-6)
    assert isinstance(loaded.peft_config, lk.FullFineTuningConfig)
    assert loaded.peft_config.frozen_modules == tuned.peft_config.frozen_modules


def test_a_plain_save_pretrained_folder_loads_as_full_fine_tuning(tmp_path):
    source = make_model("llama", seed=3)
    source.save_pretrained(tmp_path)
    loaded = lk.load_adapter(make_model("llama"), tmp_path, is_trainable=True)
    assert isinstance(loaded.peft_config, lk.FullFineTuningConfig)
    assert all(p.requires_grad for p in loaded.parameters())
    ids = batch("llama")["input_ids"]
    torch.testing.assert_close(loaded(input_ids=ids).logits, source(input_ids=ids).logits)


def test_a_folder_of_another_model_is_refused_with_the_model_unchanged(tmp_path):
    _trained("gpt2").save_adapter(tmp_path)
    model = make_model("llama")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="full fine-tuning adapter does not fit"):
        lk.load_adapter(model, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_old_full_format_still_loads(tmp_path):
    """Adapters written before (adapter_config.json with peft_type FULL) keep loading."""
    from safetensors.torch import save_file

    tuned = _trained("llama")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "FULL"}))
    save_file({k: v.contiguous() for k, v in tuned.base_model.state_dict().items()},
              str(tmp_path / "adapter_model.safetensors"))
    ids = batch("llama")["input_ids"]
    loaded = lk.load_adapter(make_model("llama"), tmp_path)
    torch.testing.assert_close(loaded(input_ids=ids).logits, tuned(input_ids=ids).logits)
