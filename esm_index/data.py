"""Task files: CSV, TSV or JSONL with a text column (or two, read as a pair) and a label column."""

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ESMIndexError

TEXT_COLUMNS = ("text", "sentence", "content", "document")
LABEL_COLUMNS = ("label", "labels", "category", "class", "target")
SOURCE_MAX_EXAMPLES = 10_000  # the paper's cap on source examples
TARGET_MAX_EXAMPLES = 1_000  # the paper's target training-set size


@dataclass
class Task:
    """Texts and labels of one labelled dataset. Texts are strings, or (first, second) pairs."""

    texts: list
    labels: np.ndarray  # class labels as str (classification) or float64 (n, t) (regression)
    regression: bool = False

    def __len__(self):
        return len(self.texts)

    def subsample(self, max_examples, seed=0):
        """A seeded random subset of at most max_examples, in file order."""
        if max_examples is not None and (not isinstance(max_examples, (int, np.integer)) or max_examples < 1):
            raise ESMIndexError(f"max_examples must be a positive integer, got {max_examples!r}")
        if max_examples is None or len(self) <= max_examples:
            return self
        keep = np.sort(np.random.default_rng(seed).choice(len(self), max_examples, replace=False))
        return Task([self.texts[i] for i in keep], self.labels[keep], self.regression)


def read_rows(path):
    """Rows of a CSV, TSV or JSONL file as dicts; the format follows the file's suffix."""
    path = Path(path)
    if not path.is_file():
        raise ESMIndexError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        text = path.read_bytes().decode("utf-8-sig")  # no newline translation: a quoted \r is data
    except UnicodeDecodeError as e:
        raise ESMIndexError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if not text.strip():
        raise ESMIndexError(f"{path}: empty file")
    if suffix in (".jsonl", ".ndjson"):
        rows = []
        for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:  # a syntax error, or a number too long to convert
                raise ESMIndexError(f"{path}:{number}: invalid JSON ({getattr(e, 'msg', e)})") from None
            if not isinstance(row, dict):
                raise ESMIndexError(f"{path}:{number}: expected a JSON object per line")
            rows.append(row)
        return rows
    if suffix in (".csv", ".tsv"):
        try:
            reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
            rows = list(reader)
        except csv.Error as e:
            raise ESMIndexError(f"{path}: malformed {suffix[1:].upper()} ({e})") from None
        if reader.fieldnames is None or not rows:
            raise ESMIndexError(f"{path}: no data rows")
        return rows
    raise ESMIndexError(f"{path}: unknown file type {suffix!r} (use .csv, .tsv or .jsonl)")


def _pick_column(path, columns, wanted, defaults, role):
    listed = ", ".join(map(repr, columns))  # repr: a column name may hold a line break
    if wanted is not None:
        if wanted not in columns:
            raise ESMIndexError(f"{path}: no {role} column {wanted!r} (columns: {listed})")
        return wanted
    for name in defaults:
        if name in columns:
            return name
    raise ESMIndexError(f"{path}: no {role} column found; name it with --{role}-column (columns: {listed})")


def _label(value, regression, path, number):
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ESMIndexError(f"{path}: row {number} has an empty label")
    if not regression:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return str(value).strip()
    values = value if isinstance(value, list) else [value]
    try:
        floats = [float(v) for v in values]
    except (TypeError, ValueError, OverflowError):
        raise ESMIndexError(f"{path}: row {number} has a non-numeric regression label {value!r}") from None
    if not all(math.isfinite(v) for v in floats):
        raise ESMIndexError(f"{path}: row {number} has a non-finite regression label {value!r}")
    return floats


def read_task(path, text_column=None, label_column=None, regression=False, max_examples=None, seed=0):
    """Read and validate a task file. `text_column` may name two columns, "a,b", read as a text pair."""
    rows = read_rows(path)
    columns = list(rows[0].keys())
    if text_column and "," in text_column:
        text_columns = [_pick_column(path, columns, c.strip(), (), "text") for c in text_column.split(",")]
        if len(text_columns) != 2:
            raise ESMIndexError(f"{path}: --text-column takes one column or two joined by a comma")
    else:
        text_columns = [_pick_column(path, columns, text_column, TEXT_COLUMNS, "text")]
    label_col = _pick_column(path, columns, label_column, LABEL_COLUMNS, "label")
    texts, labels = [], []
    for number, row in enumerate(rows, 1):
        parts = []
        for column in text_columns:
            value = row.get(column)
            if not isinstance(value, str) or not value.strip():
                raise ESMIndexError(f"{path}: row {number}: {column!r} is empty, missing or not text")
            parts.append(value.strip())
        texts.append(parts[0] if len(parts) == 1 else tuple(parts))
        labels.append(_label(row.get(label_col), regression, path, number))
    if regression:
        widths = {len(v) for v in labels}
        if len(widths) != 1:
            raise ESMIndexError(f"{path}: regression labels have differing lengths {sorted(widths)}")
        label_array = np.asarray(labels, dtype=np.float64)
    else:
        label_array = np.asarray(labels, dtype=str)
        if len(np.unique(label_array)) < 2:
            raise ESMIndexError(f"{path}: only one class ({str(label_array[0])!r}); need at least two")
    return Task(texts, label_array, regression).subsample(max_examples, seed)
