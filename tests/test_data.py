"""Property tests of the task-file readers: written rows read back exactly, and any bytes at all either
read as a valid task or fail with one ESMIndexError line (never another exception)."""

import csv
import io
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esm_index import ESMIndexError
from esm_index.data import LABEL_COLUMNS, TEXT_COLUMNS, read_task

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SUFFIXES = (".csv", ".tsv", ".jsonl")

# text a person could put in a cell: any characters but surrogates and NUL, with something besides whitespace
texts = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), min_size=1, max_size=40)
texts = texts.filter(lambda t: t.strip())
labels = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), min_size=1, max_size=8)
labels = labels.filter(lambda t: t.strip())


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("task-files")


def write(folder, suffix, rows, columns=("text", "label")):
    """Rows as a task file, written by the standard library's own writers."""
    path = folder / f"task{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(dict(zip(columns, row)), ensure_ascii=False) + "\n" for row in rows),
                        encoding="utf-8")
    else:
        buffer = io.StringIO()
        writer = csv.writer(buffer, delimiter="\t" if suffix == ".tsv" else ",")
        writer.writerow(columns)
        writer.writerows(rows)
        path.write_text(buffer.getvalue(), encoding="utf-8", newline="")
    return path


def two_classes(rows):
    return rows.filter(lambda rows: len({row[-1].strip() for row in rows}) >= 2)


@SETTINGS
@given(suffix=st.sampled_from(SUFFIXES), rows=two_classes(st.lists(st.tuples(texts, labels), min_size=2, max_size=12)))
def test_classification_rows_read_back_exactly(folder, suffix, rows):
    task = read_task(write(folder, suffix, rows))
    assert task.texts == [text.strip() for text, _ in rows]
    assert task.labels.tolist() == [label.strip() for _, label in rows]
    assert not task.regression


@SETTINGS
@given(suffix=st.sampled_from(SUFFIXES),
       rows=two_classes(st.lists(st.tuples(texts, texts, labels), min_size=2, max_size=8)))
def test_text_pairs_read_back_as_tuples(folder, suffix, rows):
    path = write(folder, suffix, rows, columns=("premise", "hypothesis", "label"))
    task = read_task(path, text_column="premise,hypothesis")
    assert task.texts == [(a.strip(), b.strip()) for a, b, _ in rows]


finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


@SETTINGS
@given(suffix=st.sampled_from(SUFFIXES), rows=st.lists(st.tuples(texts, finite), min_size=1, max_size=10))
def test_regression_labels_read_back_as_floats(folder, suffix, rows):
    task = read_task(write(folder, suffix, [(t, repr(v)) if suffix != ".jsonl" else (t, v) for t, v in rows]),
                     regression=True)
    assert task.regression and task.labels.shape == (len(rows), 1)
    np.testing.assert_array_equal(task.labels[:, 0], [v for _, v in rows])


@SETTINGS
@given(suffix=st.sampled_from(SUFFIXES), rows=st.lists(st.tuples(texts, labels), min_size=1, max_size=6),
       text_column=st.sampled_from(["text", "Text", "body"]), label_column=st.sampled_from(["label", "topic"]))
def test_missing_or_misnamed_columns_name_the_column(folder, suffix, rows, text_column, label_column):
    path = write(folder, suffix, rows, columns=(text_column, label_column))
    if text_column == "text" and label_column == "label":
        return
    with pytest.raises(ESMIndexError, match=r"no (text|label) column") as error:
        read_task(path)
    assert "\n" not in str(error.value)


defaults = set(TEXT_COLUMNS + LABEL_COLUMNS)
column_names = st.lists(texts.filter(lambda name: name not in defaults), min_size=2, max_size=2, unique=True)


@SETTINGS
@given(suffix=st.sampled_from(SUFFIXES), rows=st.lists(st.tuples(texts, labels), min_size=1, max_size=4),
       columns=column_names)
def test_unknown_column_names_are_listed_on_one_line(folder, suffix, rows, columns):
    path = write(folder, suffix, rows, columns=columns)
    with pytest.raises(ESMIndexError, match="no text column found") as error:
        read_task(path)
    assert "\n" not in str(error.value) and "\r" not in str(error.value)


@SETTINGS
@given(suffix=st.sampled_from(SUFFIXES), rows=st.lists(st.tuples(texts, st.just("only")), min_size=1, max_size=6))
def test_one_class_only_is_refused(folder, suffix, rows):
    with pytest.raises(ESMIndexError, match="only one class"):
        read_task(write(folder, suffix, rows))


@SETTINGS
@given(suffix=st.sampled_from(SUFFIXES), data=st.binary(max_size=300))
def test_any_bytes_read_as_a_task_or_fail_in_one_line(folder, suffix, data):
    path = folder / f"fuzz{suffix}"
    path.write_bytes(data)
    for regression in (False, True):
        try:
            task = read_task(path, regression=regression)
        except ESMIndexError as error:
            assert str(error) and "\n" not in str(error) and "\r" not in str(error)
        else:
            assert len(task) == len(task.labels) > 0
            assert all(isinstance(t, str) and t == t.strip() and t for t in task.texts)


# bytes that look like a task file: a header, quotes, separators, line breaks of every kind, odd values
pieces = st.sampled_from(["text", "label", "a", "b", ",", "\t", '"', "\n", "\r\n", "\r", "\u2028", "\x85", " ", "{",
                          "}", ":", "[", "]", "null", "1e999", "NaN", "9" * 400, "9" * 5000, "é", "\ufeff", "\x00"])
structured = st.lists(pieces, max_size=60).map("".join)


@SETTINGS
@given(suffix=st.sampled_from(SUFFIXES), body=structured)
def test_structured_garbage_reads_or_fails_in_one_line(folder, suffix, body):
    path = folder / f"garbage{suffix}"
    header = '{"text": ' if suffix == ".jsonl" else "text,label\n" if suffix == ".csv" else "text\tlabel\n"
    path.write_text(header + body, encoding="utf-8", errors="surrogatepass")
    for regression in (False, True):
        try:
            read_task(path, regression=regression, text_column=None)
        except ESMIndexError as error:
            assert str(error) and "\n" not in str(error) and "\r" not in str(error)


def test_empty_and_non_utf8_files_are_refused(folder):
    empty = folder / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(ESMIndexError, match="empty file"):
        read_task(empty)
    latin = folder / "latin.csv"
    latin.write_bytes("text,label\ncaf\xe9 au lait,a\nthé,b\n".encode("latin-1"))
    with pytest.raises(ESMIndexError, match="not UTF-8"):
        read_task(latin)


def test_sample_caps_must_be_positive(folder):
    task = folder / "task.csv"
    task.write_text("text,label\na,x\nb,y\nc,x\n")
    assert len(read_task(task, max_examples=2)) == 2
    for cap in (0, -1, 1.5):
        with pytest.raises(ESMIndexError, match="max_examples must be a positive integer"):
            read_task(task, max_examples=cap)
