"""Bad input: a clear error, and the model left exactly as it was."""

import pytest
import torch
from tuning_models import (
    assert_same_snapshot,
    make_model,
    one_thread,  # noqa: F401  (autouse fixture)
    snapshot,
)

import lora_kernels as lk
from lora_kernels.nn import LoRALinear


@pytest.mark.parametrize(
    "kind, config, match",
    [
        ("gpt2", lk.LoraConfig(target_modules=["c_attn", "q_proj"]), r"\['q_proj'\] match no module.*c_attn"),
        ("llama", lk.LoraConfig(target_modules=r".*\.qq_proj"), "matches no module.*q_proj"),
        ("gpt2", lk.LoraConfig(target_modules=["wte"]), "supports nn.Linear and Conv1D"),
        ("llama", lk.LoraConfig(target_modules=["q_proj"], layers_to_transform=[7]), "no module left"),
        ("gpt2", lk.LoraConfig(modules_to_save=["classifier"]), "'classifier' matches no module"),
        ("llama", lk.PrefixTuningConfig(num_layers=5), "num_layers=5 does not fit"),
        ("llama", lk.PrefixTuningConfig(num_attention_heads=4), "num_attention_heads=4 does not fit"),
        ("bert", lk.PromptTuningConfig(token_dim=64), "token_dim=64 does not fit"),
        ("gpt2", lk.FullFineTuningConfig(frozen_modules=["encoder"]), "'encoder' matches no module"),
    ],
)
def test_config_that_does_not_fit(kind, config, match):
    model = make_model(kind)
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        lk.tune(model, config)
    assert_same_snapshot(before, snapshot(model))


def test_bad_config_values():
    with pytest.raises(ValueError, match="bias"):
        lk.LoraConfig(bias="some")
    with pytest.raises(ValueError, match="r: expected a positive int"):
        lk.LoraConfig(r=0)
    with pytest.raises(ValueError, match="task_type"):
        lk.LoraConfig(task_type="CAUSAL")
    with pytest.raises(ValueError, match="prompt_tuning_init_text"):
        lk.PromptTuningConfig(prompt_tuning_init="TEXT")
    with pytest.raises(ValueError, match="input"):
        lk.PromptTuningConfig(prompt_template="no slot")
    with pytest.raises(TypeError, match="expected one of"):
        lk.tune(make_model("gpt2"), object())


def test_failure_half_way_restores_the_model(monkeypatch):
    """An error after some modules were swapped (here: the third swap fails) undoes all."""
    model = make_model("llama")
    before = snapshot(model)
    real, count = LoRALinear.from_linear.__func__, []

    def flaky(cls, *args, **kwargs):
        count.append(1)
        if len(count) == 3:
            raise RuntimeError("boom")
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(LoRALinear, "from_linear", classmethod(flaky))
    with pytest.raises(RuntimeError, match="boom"):
        lk.tune(model, lk.LoraConfig(target_modules="all-linear", modules_to_save=["lm_head"]))
    assert_same_snapshot(before, snapshot(model))


def test_tuning_twice_is_refused():
    model = make_model("gpt2")
    tuned = lk.tune(model, lk.LoraConfig())
    with pytest.raises(TypeError, match="already a TunedModel"):
        lk.tune(tuned, lk.LoraConfig())
    before = snapshot(model)
    with pytest.raises(ValueError, match="already holds LoRALinear"):
        lk.tune(model, lk.LoraConfig())
    assert_same_snapshot(before, snapshot(model))
    with pytest.raises(ValueError, match="no weights to merge"):
        lk.tune(make_model("gpt2"), lk.PrefixTuningConfig(num_virtual_tokens=2)).merge_and_unload()


def _saved(tmp_path, kind, config, **model_kw):
    tuned = lk.tune(make_model(kind, **model_kw), config)
    tuned.save_adapter(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    "src_kind, config, dst, match",
    [
        ("gpt2", lk.LoraConfig(r=2), "llama", "does not fit LlamaForCausalLM.*c_attn"),
        ("llama", lk.LoraConfig(r=2, target_modules=["q_proj", "down_proj"]), "llama_wide", "shapes differ"),
        ("llama", lk.PrefixTuningConfig(num_virtual_tokens=2), "gpt2", "adapter in .* does not fit GPT2"),
        ("gpt2", lk.PromptTuningConfig(num_virtual_tokens=2), "llama_wide", "token_dim=32 does not fit"),
        ("gpt2", lk.FullFineTuningConfig(), "llama", "does not fit"),
    ],
)
def test_adapter_of_another_shape_or_architecture(tmp_path, src_kind, config, dst, match):
    import transformers as tf

    path = _saved(tmp_path, src_kind, config)
    if dst == "llama_wide":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(num_hidden_layers=2, hidden_size=48, num_attention_heads=4,
                                                   num_key_value_heads=2, intermediate_size=64, vocab_size=100))
    else:
        model = make_model(dst)
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        lk.load_adapter(model, path)
    assert_same_snapshot(before, snapshot(model))


def test_missing_or_pickled_files(tmp_path):
    model = make_model("gpt2")
    before = snapshot(model)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lk.load_adapter(model, tmp_path)
    tuned = lk.tune(make_model("gpt2"), lk.LoraConfig(r=2))
    tuned.save_adapter(tmp_path, safe_serialization=False)
    with pytest.raises(ValueError, match="allow_bin=True"):
        lk.load_adapter(model, tmp_path)
    (tmp_path / "adapter_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        lk.load_adapter(model, tmp_path)
    assert_same_snapshot(before, snapshot(model))


def test_dora_adapter_is_refused(tmp_path):
    import json

    path = _saved(tmp_path, "gpt2", lk.LoraConfig(r=2))
    data = json.loads((path / "adapter_config.json").read_text())
    data["use_dora"] = True
    (path / "adapter_config.json").write_text(json.dumps(data))
    model = make_model("gpt2")
    before = snapshot(model)
    with pytest.raises(ValueError, match="use_dora"):
        lk.load_adapter(model, path)
    assert_same_snapshot(before, snapshot(model))
    assert torch.is_tensor(before["state"]["lm_head.weight"])


def test_prefix_on_an_encoder_decoder_is_refused():
    """T5: 4 self-attention modules for a 2-layer config (encoder and decoder); refused."""
    import transformers as tf

    model = tf.T5ForConditionalGeneration(tf.T5Config(num_layers=2, d_model=32, num_heads=4, d_kv=8,
                                                      d_ff=64, vocab_size=100))
    before = snapshot(model)
    with pytest.raises(ValueError, match="found 4 self-attention modules"):
        lk.tune(model, lk.PrefixTuningConfig(num_virtual_tokens=2))
    assert_same_snapshot(before, snapshot(model))
