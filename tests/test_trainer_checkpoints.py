"""A TunedModel under transformers' Trainer with checkpoints: a tied-embedding GPT-2 saves
without error, a checkpoint holds the trainable tensors only (and with the callback, the adapter
in PEFT's format), and resume_from_checkpoint continues to the same weights as an uninterrupted
run (adapter, optimizer and scheduler state restored)."""

import copy

import pytest
import torch
from tuning_models import (
    VOCAB,
    make_model,
    one_thread,  # noqa: F401  (autouse fixture)
)

import lora_kernels as lk

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # Trainer needs it


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=16, L=9):
        g = torch.Generator().manual_seed(7)
        self.ids = torch.randint(3, VOCAB, (n, L), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer(tuned, out, max_steps, callbacks=()):
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-2,
        lr_scheduler_type="linear", save_strategy="steps", save_steps=2, logging_steps=100,
        report_to=[], use_cpu=True, seed=3, data_seed=3, disable_tqdm=True)
    return transformers.Trainer(model=tuned, args=args, train_dataset=_Rows(), callbacks=list(callbacks))


def _config(method):
    if method == "lora":
        return lk.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], init_lora_weights="gaussian")
    if method == "prompt":
        return lk.PromptTuningConfig(num_virtual_tokens=3)
    return lk.FullFineTuningConfig()


def _method_tensors(tuned):
    return {k: v.detach().clone() for k, v in tuned.state_dict().items()}


@pytest.mark.parametrize("method", ["lora", "prompt", "full"])
def test_checkpoints_hold_the_adapter_and_resume_continues(method, tmp_path):
    from safetensors.torch import load_file

    from lora_kernels.integrations.trainer import AdapterCheckpointCallback

    base = make_model("gpt2")  # tied wte / lm_head: Trainer's default save used to crash on it
    straight = lk.tune(copy.deepcopy(base), _config(method))
    _trainer(straight, tmp_path / "a", 4, [AdapterCheckpointCallback()]).train()
    final = _method_tensors(straight)

    ckpt = tmp_path / "a" / "checkpoint-2"
    saved = load_file(str(ckpt / "model.safetensors"))
    model_bytes = sum(v.numel() * v.element_size() for v in base.state_dict().values())
    saved_bytes = sum(v.numel() * v.element_size() for v in saved.values())
    if method == "full":
        assert "base_model.lm_head.weight" not in saved and len(saved) == len(base.state_dict()) - 1
        assert not (ckpt / "adapter_config.json").exists()
    else:
        assert saved.keys() == final.keys() and saved_bytes < 0.1 * model_bytes
        # the callback's copy in PEFT's format loads here (and in PEFT, see below) as step 2's weights
        loaded = lk.load_adapter(copy.deepcopy(base), ckpt)
        assert all(torch.equal(loaded.state_dict()[k], saved[k]) for k in saved)

    resumed = lk.tune(copy.deepcopy(base), _config(method))
    trainer = _trainer(resumed, tmp_path / "b", 4)
    trainer.train(resume_from_checkpoint=str(ckpt))
    assert trainer.state.global_step == 4
    for key, value in _method_tensors(resumed).items():
        torch.testing.assert_close(value, final[key], rtol=1e-5, atol=1e-6, msg=key)
    assert any(not torch.equal(final[k], saved[k]) for k in saved)  # steps 3-4 did train


def test_checkpoint_adapter_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    from lora_kernels.integrations.trainer import AdapterCheckpointCallback

    base = make_model("gpt2")
    tuned = lk.tune(copy.deepcopy(base), _config("lora"))
    _trainer(tuned, tmp_path, 2, [AdapterCheckpointCallback()]).train()
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "checkpoint-2")).eval()
    ids = _Rows()[0]["input_ids"][None]
    torch.testing.assert_close(theirs(input_ids=ids).logits, tuned.eval()(input_ids=ids).logits,
                               rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip_and_strictness():
    tuned = lk.tune(make_model("llama"), lk.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    state = tuned.state_dict()
    assert set(state) == {k for k, p in tuned.named_parameters() if p.requires_grad}
    other = lk.tune(make_model("llama", seed=1), lk.LoraConfig(r=2, target_modules=["q_proj"],
                                                               modules_to_save=["lm_head"]))
    assert not other.load_state_dict(state).missing_keys
    assert all(torch.equal(other.state_dict()[k], v) for k, v in state.items())
    state.pop(next(iter(state)))
    with pytest.raises(RuntimeError, match="Missing key"):
        other.load_state_dict(state)
    assert len(other.load_state_dict(state, strict=False).missing_keys) == 1
    wrapped = torch.nn.ModuleDict({"module": other})  # through a wrapper, as DDP's "module."
    assert not wrapped.load_state_dict(wrapped.state_dict()).missing_keys
