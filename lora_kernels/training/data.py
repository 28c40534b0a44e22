"""Reading and checking the user's data: ``.jsonl`` and ``.csv`` files of records with a text
field and (for classification) a label field, turned into token batches.

Every problem a user can cause (no such file, unreadable bytes, an empty file, a missing field,
a single class) raises :class:`DataError` with a message that names the file, the line and what
was expected, before any model is loaded.
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch


class DataError(ValueError):
    """The data file cannot be used as given; the message says why."""


def load_records(
    path: str | Path, text_field: str, label_field: str | None = None, *,
    label_optional: bool = False,
) -> list[dict]:
    """Records of a ``.jsonl`` (one JSON object a line) or ``.csv`` (header row) file, each
    reduced to ``{"text": str, "label": str}`` (``label`` only when ``label_field`` is given).

    Labels may be strings or integers (JSON), not both in one file. With ``label_optional`` a
    file whose records all lack ``label_field`` gives records without ``label``.

    Raises :class:`DataError` for a missing or unreadable file, an unknown extension, an empty
    file, a line that is not a JSON object, a malformed CSV row, a record without ``text_field``
    / ``label_field``, a null, empty or non-string text, a null or empty label, or labels that
    mix types.
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
    if label_field and label_optional and not any(label_field in row for _, row in rows):
        label_field = None
    out, kinds = [], {}
    for line_no, row in rows:
        where = f"{path}, record on line {line_no}"
        rec = {"text": _field(row, text_field, where, "--text-field", texts=True)}
        if label_field:
            label = _field(row, label_field, where, "--label-field", texts=False)
            kinds.setdefault(type(label), (line_no, label))
            rec["label"] = str(label)
        out.append(rec)
    if len(kinds) > 1:
        (l1, v1), (l2, v2) = list(kinds.values())[:2]
        raise DataError(
            f"{path}: field {label_field!r} mixes label types: {v1!r} on line {l1} and {v2!r} on "
            f"line {l2}; write every label the same way (all strings or all integers)"
        )
    return out


def _field(row: dict, name: str, where: str, flag: str, texts: bool) -> str | int:
    """``row[name]`` checked: a non-empty string (text), or a string or integer (label)."""
    if name not in row:
        raise DataError(f"{where}: missing field {name!r} (the record has {sorted(row)}); set {flag}")
    value = row[name]
    if value is None:
        raise DataError(f"{where}: field {name!r} is null")
    if isinstance(value, float) and value.is_integer() and not texts:
        value = int(value)
    allowed = (str,) if texts else (str, int)
    if not isinstance(value, allowed) or isinstance(value, bool):
        expected = "a string" if texts else "a string or an integer"
        raise DataError(f"{where}: field {name!r} is {type(value).__name__} {value!r}, expected {expected}")
    if isinstance(value, str):
        value = value.strip()
        if not value:
            raise DataError(f"{where}: field {name!r} is empty")
    return value


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
    """Rows of a CSV file with a header (quoted fields may span lines), keyed by the line each
    record starts on. Raises :class:`DataError` for an unclosed quote or a row whose number of
    fields differs from the header's."""
    reader = csv.reader(io.StringIO(raw, newline=""), strict=True)
    rows, start = [], 1
    try:
        header = next(reader, None)
        if not header or not any(h.strip() for h in header):
            raise DataError(f"{path}: the CSV file has no header row")
        for values in reader:
            line_no, start = start + 1, reader.line_num
            if not values:
                continue
            if len(values) != len(header):
                hint = ("quote fields that contain a comma" if len(values) > len(header)
                        else "a field or a comma is missing")
                raise DataError(
                    f"{path}, record on line {line_no}: {len(values)} field"
                    f"{'s' * (len(values) != 1)}, the header has {len(header)} "
                    f"({', '.join(header)}); {hint}"
                )
            rows.append((line_no, dict(zip(header, values))))
    except csv.Error as e:
        line_no = start + 1
        if "unexpected end of data" in str(e) or "EOF inside string" in str(e):
            raise DataError(
                f"{path}, record on line {line_no}: a quoted field is never closed (its opening "
                f"quote swallows the rest of the file)"
            ) from e
        raise DataError(f"{path}, record on line {line_no}: not valid CSV ({e})") from e
    return rows


def label_names(records: Sequence[dict], where: str = "the data") -> list[str]:
    """The label set of ``records``, sorted (integers by value); raises :class:`DataError` with
    fewer than 2 classes."""
    counts = Counter(r["label"] for r in records)
    if len(counts) < 2:
        only = next(iter(counts), None)
        raise DataError(
            f"{where}: classification needs at least 2 classes, found only {only!r} "
            f"in {len(records)} records"
        )
    return sorted(counts, key=lambda s: (0, int(s), "") if s.lstrip("-").isdigit() else (1, 0, s))


def split_records(
    records: Sequence[dict], val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0
) -> tuple[list[dict], list[dict], list[dict]]:
    """A seeded shuffle into train / validation / test. A split with a fraction > 0 gets at least
    one record; a fraction of 0 gives an empty split (its data comes from another file)."""
    wanted = (val_fraction > 0) + (test_fraction > 0)
    if len(records) < wanted + 1:
        raise DataError(f"need at least {wanted + 1} records to split off validation/test "
                        f"records, got {len(records)}")
    rows = list(records)
    random.Random(seed).shuffle(rows)
    n_val = max(1, round(len(rows) * val_fraction)) if val_fraction > 0 else 0
    n_test = max(1, round(len(rows) * test_fraction)) if test_fraction > 0 else 0
    if n_val + n_test >= len(rows):
        n_val, n_test = min(n_val, 1), min(n_test, 1)
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
        ``labels``: (B,) class ids, or (B, L) token ids with -100 on padding for causal LM (no
        ``labels`` for a classification split without them)."""
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
            elif self.labels is not None:
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
