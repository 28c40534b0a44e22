"""The main job's pieces: the committed dataset equals its seeded generator's output and has the
stated splits; the demo's training function runs all four methods on a tiny model; its recipe
trains the pooler with the head and puts LoRA on the encoder only; the recipe sweep
(benchmarks/demo_sweep.py) runs and chooses by validation only; metrics."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from lora_kernels.training.metrics import accuracy, macro_f1

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"


def _load_sweep():
    spec = importlib.util.spec_from_file_location("demo_sweep", ROOT / "benchmarks" / "demo_sweep.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("demo_sweep", module)
    spec.loader.exec_module(module)
    return module


def test_dataset_is_reproducible(tmp_path):
    spec = importlib.util.spec_from_file_location("gen", DATA / "generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    counts = gen.generate(tmp_path)
    assert counts == {"train": 3000, "validation": 600, "test": 1000}
    texts = {}
    for split in counts:
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (DATA / "reviews" / f"{split}.jsonl").read_bytes()
        rows = [json.loads(line) for line in (DATA / "reviews" / f"{split}.jsonl").read_text().splitlines()]
        assert {r["label"] for r in rows} == {"negative", "neutral", "positive"}
        texts[split] = {r["text"] for r in rows}
    assert not (texts["train"] & texts["test"]) and not (texts["train"] & texts["validation"])


def test_metrics():
    gold, pred = [0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0]
    assert accuracy(pred, gold) == pytest.approx(4 / 6)
    # per class F1: 0 -> 0.5, 1 -> 0.8, 2 -> 2/3
    assert macro_f1(pred, gold) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    with pytest.raises(ValueError, match="equal non-empty"):
        accuracy([], [])


def test_run_demo_tiny(tmp_path):
    pytest.importorskip("transformers")
    from _tiny_models import save_tiny_bert

    from lora_kernels.training.demo import format_table, plot, run_demo

    model_dir = save_tiny_bert(tmp_path / "bert", num_labels=3)
    result = run_demo(model_dir, DATA / "reviews", train_size=32, val_size=8, test_size=8, epochs=2,
                      batch_size=16, progress=False)
    assert [r["method"] for r in result["rows"]] == ["full fine-tuning", "prompt tuning", "prefix tuning", "LoRA"]
    runs = result["runs"]
    assert runs["full"]["trainable_share"] == 1.0
    assert all(0 < runs[m]["trainable_share"] < 0.05 for m in ("prompt", "prefix", "lora"))
    for res in runs.values():
        assert len(res["history"]["train_loss"]) == 2 * 2 and len(res["history"]["val"]) == 2
        assert res["step_time_ms"] > 0 and 1 <= res["best_epoch"] <= 2
    table = format_table(result["rows"])
    assert table.count("\n") == 5 and "test F1" in table
    pytest.importorskip("matplotlib")
    assert plot(result, tmp_path / "demo.png").stat().st_size > 1000


def test_recipe_trains_pooler_and_lora_on_encoder_only(tmp_path):
    pytest.importorskip("transformers")
    from _tiny_models import save_tiny_bert
    from transformers import AutoModelForSequenceClassification

    from lora_kernels.training.demo import recipe_config
    from lora_kernels.training.methods import apply_method

    model_dir = save_tiny_bert(tmp_path / "bert", num_labels=3)
    cfg = recipe_config("lora", r=4)
    # the pooler and the encoder-only targets come from the tuning layer's SEQ_CLS defaults
    assert cfg.lora_alpha == 8 and cfg.modules_to_save == [] and cfg.target_modules == "all-linear"
    for method in ("lora", "prefix", "prompt"):
        cfg = recipe_config(method, **({"r": 4} if method == "lora" else {}))
        tuned = apply_method(AutoModelForSequenceClassification.from_pretrained(model_dir), method, cfg)
        trained = {n for n, p in tuned.named_parameters() if p.requires_grad}
        head = {n for n in trained if ".pooler." in n or ".classifier." in n}
        assert sorted(n.split(".", n.count(".") - 1)[-1] for n in head) == [
            "classifier.bias", "classifier.weight", "dense.bias", "dense.weight"]
        adapters = trained - head
        if method == "lora":  # query, key, value and the three dense layers of both encoder layers
            wrapped = {n.rsplit(".lora_", 1)[0] for n in adapters}
            assert all("encoder.layer." in n for n in wrapped) and len(wrapped) == 2 * 6
            assert all(n.endswith((".lora_A", ".lora_B")) for n in adapters)
        else:
            assert adapters and not any("encoder.layer" in n or "pooler" in n for n in adapters)


def test_sweep_chooses_by_validation_then_cost():
    sweep = _load_sweep()
    runs = [
        {"key": "a", "method": "lora", "val_accuracy": 0.90, "trainable_params": 200, "val_loss": 0.2, "test_accuracy": 0.99},
        {"key": "b", "method": "lora", "val_accuracy": 0.90, "trainable_params": 100, "val_loss": 0.4, "test_accuracy": 0.10},
        {"key": "c", "method": "lora", "val_accuracy": 0.90, "trainable_params": 100, "val_loss": 0.3, "test_accuracy": 0.20},
        {"key": "d", "method": "full", "val_accuracy": 0.80, "trainable_params": 9, "val_loss": 0.1, "test_accuracy": 0.95},
        {"key": "e", "method": "full", "val_accuracy": 0.85, "trainable_params": 9, "val_loss": 0.9, "test_accuracy": 0.50},
    ]
    assert {m: r["key"] for m, r in sweep.choose(runs).items()} == {"lora": "c", "full": "e"}
    points = sweep.grid_points(["lora"], {"lora": {"lr": [1e-3, 2e-3], "r": [16, 8]}})
    assert points[0] == ("lora", {"lr": 1e-3, "r": 8}) and len(points) == 4


def test_sweep_runs_tiny(tmp_path):
    pytest.importorskip("transformers")
    from _tiny_models import save_tiny_bert

    sweep = _load_sweep()
    model_dir = save_tiny_bert(tmp_path / "bert", num_labels=3)
    out = tmp_path / "sweep"
    args = ["--model", str(model_dir), "--out", str(out), "--methods", "full", "lora", "--lr", "full=1e-4",
            "lora=1e-3", "--r", "4", "--train-size", "16", "--val-size", "8", "--test-size", "8", "--epochs", "1"]
    assert sweep.main(args) == 0
    text = (out / "sweep.json").read_text()
    assert str(tmp_path) not in text and '"/' not in text  # nothing of this machine's paths
    data = json.loads(text)
    assert [r["key"] for r in data["runs"]] == ["full lr=0.0001", "lora lr=0.001 r=4"]
    assert set(data["chosen"]) == {"full", "lora"} and data["settings"]["sizes"]["train"] == 16
    assert data["runs"][1]["lora_alpha"] == 8 and len(data["runs"][1]["val_accuracy_per_epoch"]) == 1
    table = (out / "sweep.md").read_text()
    assert "| **LoRA** | **lr 0.001, r 4, alpha 8** |" in table and "test acc (info)" in table
    assert sweep.main([*args, "--resume"]) == 0  # nothing left to run: the same two runs
    assert len(json.loads((out / "sweep.json").read_text())["runs"]) == 2


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux /proc only")
def test_peak_memory_sees_a_temporary():
    import torch

    from lora_kernels.training.memory import PeakMemory

    with PeakMemory("cpu") as small:
        torch.ones(1024).sum()
    with PeakMemory("cpu") as big:
        torch.ones(16 * 2**20).sum()  # 64 MiB, freed before the block ends
    assert big.peak_bytes >= 48 * 2**20
    assert small.peak_bytes < big.peak_bytes
