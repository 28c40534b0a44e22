"""The main job's pieces: the committed dataset equals its seeded generator's output and has the
stated splits; the demo's training function runs all four methods on a tiny model; metrics."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from lora_kernels.training.metrics import accuracy, macro_f1

DATA = Path(__file__).resolve().parent.parent / "data"


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
