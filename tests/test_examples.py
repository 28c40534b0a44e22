"""Every script in python/ runs on its tiny default (in this process, a few steps each)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
EXAMPLES = Path(__file__).resolve().parent.parent / "python"


def _load(name):
    sys.path.insert(0, str(EXAMPLES))
    try:
        spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(EXAMPLES))


def test_every_example_is_covered():
    scripts = {p.stem for p in EXAMPLES.glob("*.py") if not p.stem.startswith("_")}
    assert scripts == {"lora_causal_lm_trainer", "prefix_tuning_checkpointing", "prompt_tuning_verbalizer",
                       "accelerate_peft_model", "lora_linear_dropin"}


def test_lora_linear_dropin():
    first, last, merged_err = _load("lora_linear_dropin").main(["--steps", "20"])
    assert last < first and merged_err < 1e-4


def test_accelerate_peft_model():
    pytest.importorskip("peft")
    assert _load("accelerate_peft_model").main(["--steps", "1"]) < 1e-4


def test_prompt_tuning_verbalizer():
    acc = _load("prompt_tuning_verbalizer").main(["--steps", "3"])
    assert 0.0 <= acc <= 1.0


def test_prefix_tuning_checkpointing():
    losses = _load("prefix_tuning_checkpointing").main(["--steps", "4"])
    assert losses[-1] < losses[0]


def test_lora_causal_lm_trainer(tmp_path):
    loss = _load("lora_causal_lm_trainer").main(["--steps", "2", "--out", str(tmp_path)])
    assert loss > 0
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()
