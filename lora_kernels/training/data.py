"""Reading and checking the user's data: ``.jsonl`` and ``.csv`` files of records with a text
field and (for classification) a label field, turned into token batches.

Every problem a user can cause (no such file, unreadable bytes, an empty file, a missing field,
a single class) raises :class:`DataError` with a message that names the file, the line and what
was expected, before any model is loaded.
"""

from __future__ import annotations

import csv
import json
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch


class DataError(ValueError):
    """The data file cannot be used as given; the message says why."""


def load_records(path: str | Path, text_field: str, label_field: str | None = None) -> list[dict]:
    """Records of a ``.jsonl`` (one JSON object a line) or ``.csv`` (header row) file, each
    reduced to ``{"text": str, "label": str}`` (``label`` only when ``label_field`` is given).

    Raises :class:`DataError` for a missing or unreadable file, an unknown extension, an empty
    file, a line that is not a JSON object, a record without ``text_field`` / ``label_field``,
    or an empty text.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise DataError(f"{path}: expected a .jsonl or .csv file, got {suffix or 'no extension'!r}")
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the file as UTF-8 text ({e})") from e
    if not raw.strip():
        raise DataError(f"{path}: the file is empty")
    rows = _read_jsonl(path, raw) if suffix == ".jsonl" else _read_csv(path, raw)
    if not rows:
        raise DataError(f"{path}: the file has no records")
    fields = [text_field] + ([label_field] if label_field else [])
    out = []
    for line_no, row in rows:
        missing = [f for f in fields if f not in row or row[f] is None]
        if missing:
            raise DataError(
                f"{path}, record on line {line_no}: missing field {missing[0]!r} "
                f"(the record has {sorted(row)}); set --text-field / --label-field"
            )
        text = str(row[text_field]).strip()
        if not text:
            raise DataError(f"{path}, record on line {line_no}: field {text_field!r} is empty")
        rec = {"text": text}
        if label_field:
            rec["label"] = str(row[label_field]).strip()
        out.append(rec)
    return out


def _read_jsonl(path: Path, raw: str) -> list[tuple[int, dict]]:
    rows = []
    for i, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {i}: not valid JSON ({e.msg})") from e
        if not isinstance(obj, dict):
            raise DataError(f"{path}, line {i}: expected a JSON object, got {type(obj).__name__}")
        rows.append((i, obj))
    return rows


def _read_csv(path: Path, raw: str) -> list[tuple[int, dict]]:
    try:
        reader = csv.DictReader(raw.splitlines())
        rows = [(i + 2, dict(r)) for i, r in enumerate(reader)]
    except csv.Error as e:
        raise DataError(f"{path}: not a readable CSV file ({e})") from e
    if reader.fieldnames is None:
        raise DataError(f"{path}: the CSV file has no header row")
    return rows


def label_names(records: Sequence[dict], where: str = "the data") -> list[str]:
    """The sorted label set of ``records``; raises :class:`DataError` with fewer than 2 classes."""
    counts = Counter(r["label"] for r in records)
    if len(counts) < 2:
        only = next(iter(counts), None)
        raise DataError(
            f"{where}: classification needs at least 2 classes, found only {only!r} "
            f"in {len(records)} records"
        )
    return sorted(counts)


def split_records(
    records: Sequence[dict], val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0
) -> tuple[list[dict], list[dict], list[dict]]:
    """A seeded shuffle into train / validation / test (each split keeps at least one record)."""
    if len(records) < 3:
        raise DataError(f"need at least 3 records to split into train/validation/test, got {len(records)}")
    rows = list(records)
    random.Random(seed).shuffle(rows)
    n_val = max(1, round(len(rows) * val_fraction))
    n_test = max(1, round(len(rows) * test_fraction))
    if n_val + n_test >= len(rows):
        n_val = n_test = 1
    return rows[n_val + n_test :], rows[:n_val], rows[n_val : n_val + n_test]


@dataclass
class TokenizedSplit:
    """Token ids per example (unpadded, truncated) and integer labels (or None for causal LM)."""

    input_ids: list[list[int]]
    labels: list[int] | None

    def __len__(self) -> int:
        return len(self.input_ids)

    def batches(
        self, batch_size: int, pad_id: int, *, shuffle: bool = False, seed: int = 0, causal: bool = False
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Dynamically padded batches: ``input_ids``/``attention_mask`` (B, L) int64 and
        ``labels``: (B,) class ids, or (B, L) token ids with -100 on padding for causal LM."""
        order = list(range(len(self)))
        if shuffle:
            random.Random(seed).shuffle(order)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            seqs = [self.input_ids[i] for i in idx]
            length = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), length), dtype=torch.long)
            for row, s in enumerate(seqs):
                ids[row, : len(s)] = torch.tensor(s)
                mask[row, : len(s)] = 1
            batch = {"input_ids": ids, "attention_mask": mask}
            if causal:
                batch["labels"] = ids.masked_fill(mask == 0, -100)
            else:
                batch["labels"] = torch.tensor([self.labels[i] for i in idx], dtype=torch.long)
            yield batch


def tokenize(
    tokenizer, records: Sequence[dict], max_length: int, label_ids: dict[str, int] | None = None,
    where: str = "the data",
) -> TokenizedSplit:
    """Tokenize ``records`` (truncating to ``max_length`` tokens); map labels through
    ``label_ids`` (raises :class:`DataError` for a label not seen in training)."""
    enc = tokenizer([r["text"] for r in records], truncation=True, max_length=max_length)
    labels = None
    if label_ids is not None:
        unknown = sorted({r["label"] for r in records} - set(label_ids))
        if unknown:
            raise DataError(f"{where}: labels {unknown} do not occur in the training data")
        labels = [label_ids[r["label"]] for r in records]
    return TokenizedSplit(list(enc["input_ids"]), labels)
