"""`lora-kernels finetune` on tiny local model folders and data files, and every bad-data
error (clear message, exit status 2, before any model is loaded)."""

from __future__ import annotations

import json
import random

import pytest

pytest.importorskip("transformers")

from _tiny_models import save_tiny_bert, save_tiny_llama  # noqa: E402

from lora_kernels import cli  # noqa: E402

WORDS = {"pos": ["great", "lovely", "superb", "fine"], "neg": ["awful", "bad", "dull", "poor"]}


def _rows(n=40, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        lab = "pos" if i % 2 else "neg"
        rows.append({"sentence": f"the film was {rng.choice(WORDS[lab])} and {rng.choice(WORDS[lab])}",
                     "sentiment": lab})
    return rows


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def _finetune(*args):
    return cli.main(["finetune", *map(str, args), "--no-progress"])


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_classification_saves_peft_adapter_and_metrics(tmp_path, bert_dir, method, capsys):
    data = _write_jsonl(tmp_path / "train.jsonl", _rows())
    out = tmp_path / "out"
    rc = _finetune(bert_dir, data, "--method", method, "--text-field", "sentence",
                   "--label-field", "sentiment", "--epochs", "2", "--batch-size", "8",
                   "--r", "4", "--num-virtual-tokens", "4", "--out", out)
    assert rc == 0
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == {"lora": "LORA", "prefix": "PREFIX_TUNING"}[method]
    from safetensors.torch import load_file

    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    if method == "lora":
        assert cfg["r"] == 4
        assert any(k.startswith("base_model.model.") and k.endswith("lora_A.weight") for k in tensors)
    else:
        assert "prompt_embeddings" in tensors and tensors["prompt_embeddings"].shape[0] == 4
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["labels"] == ["neg", "pos"]
    assert metrics["sizes"] == {"train": 32, "validation": 4, "test": 4}
    assert 0.0 <= metrics["test"]["accuracy"] <= 1.0 and 0.0 <= metrics["test"]["macro_f1"] <= 1.0
    assert len(metrics["history"]["val"]) == 2 and 1 <= metrics["best_epoch"] <= 2
    assert 0 < metrics["trainable_params"] < metrics["total_params"]
    assert "test accuracy" in capsys.readouterr().out


def test_full_fine_tuning_saves_a_loadable_model(tmp_path, bert_dir):
    from transformers import AutoModelForSequenceClassification

    data = _write_jsonl(tmp_path / "train.jsonl", _rows(30))
    rc = _finetune(bert_dir, data, "--method", "full", "--text-field", "sentence", "--label-field",
                   "sentiment", "--epochs", "1", "--out", tmp_path / "out")
    assert rc == 0
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "model")
    assert model.config.id2label == {0: "neg", 1: "pos"}
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["trainable_share"] == 1.0


def test_csv_causal_lm_with_separate_splits(tmp_path, llama_dir):
    def csv(name, rows):
        lines = ["id,sentence"] + [f'{i},"{r["sentence"]}"' for i, r in enumerate(rows)]
        (tmp_path / name).write_text("\n".join(lines) + "\n")
        return tmp_path / name

    train, val, test = csv("train.csv", _rows(24)), csv("val.csv", _rows(6, 1)), csv("test.csv", _rows(6, 2))
    out = tmp_path / "out"
    rc = _finetune(llama_dir, train, "--validation", val, "--test", test, "--task", "causal-lm",
                   "--method", "lora", "--text-field", "sentence", "--epochs", "1",
                   "--batch-size", "8", "--target-modules", "q_proj,v_proj", "--out", out)
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["sizes"] == {"train": 24, "validation": 6, "test": 6}
    assert metrics["test"]["perplexity"] > 1.0
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]


def _bad(tmp_path, capsys, data, *extra):
    rc = _finetune(tmp_path / "no_model_needed", data, "--text-field", "sentence",
                   "--label-field", "sentiment", "--out", tmp_path / "out", *extra)
    err = capsys.readouterr().err
    assert rc == 2
    assert not (tmp_path / "out").exists()
    return err


def test_missing_field(tmp_path, capsys):
    rows = _rows(6)
    del rows[3]["sentiment"]
    err = _bad(tmp_path, capsys, _write_jsonl(tmp_path / "d.jsonl", rows))
    assert "line 4" in err and "missing field 'sentiment'" in err


def test_missing_text_field_in_csv(tmp_path, capsys):
    (tmp_path / "d.csv").write_text("text,sentiment\nhello,pos\nbye,neg\n")
    err = _bad(tmp_path, capsys, tmp_path / "d.csv")
    assert "missing field 'sentence'" in err and "['sentiment', 'text']" in err


def test_one_class_only(tmp_path, capsys):
    rows = [dict(r, sentiment="pos") for r in _rows(12)]
    err = _bad(tmp_path, capsys, _write_jsonl(tmp_path / "d.jsonl", rows))
    assert "at least 2 classes" in err and "'pos'" in err


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, capsys, content):
    (tmp_path / "d.jsonl").write_text(content)
    assert "empty" in _bad(tmp_path, capsys, tmp_path / "d.jsonl")


def test_unreadable_file(tmp_path, capsys):
    (tmp_path / "d.jsonl").write_bytes(b"\xff\xfe\x00\x81 not utf-8 \xc3\x28")
    assert "cannot read" in _bad(tmp_path, capsys, tmp_path / "d.jsonl")


def test_not_json(tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text('{"sentence": "ok", "sentiment": "pos"}\n{broken\n')
    assert "line 2: not valid JSON" in _bad(tmp_path, capsys, tmp_path / "d.jsonl")


def test_no_such_file_and_wrong_extension(tmp_path, capsys):
    assert "no such file" in _bad(tmp_path, capsys, tmp_path / "missing.jsonl")
    (tmp_path / "d.txt").write_text("hello\n")
    assert "expected a .jsonl or .csv" in _bad(tmp_path, capsys, tmp_path / "d.txt")


def test_not_a_model_folder(tmp_path, capsys):
    data = _write_jsonl(tmp_path / "d.jsonl", _rows(10))
    err = _bad(tmp_path, capsys, data)
    assert "not a model folder" in err


def test_info_still_works(capsys):
    assert cli.main(["info"]) == 0
    assert "backends:" in capsys.readouterr().out
