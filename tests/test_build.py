"""Building many sources: a folder or a manifest, prepared here or on Dask workers, committed one by one;
a failing source is reported without stopping the others, and a killed build resumes where it stopped."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from esm_index import ESMIndex, ESMIndexError
from esm_index.build import BuildSettings, SourceSpec, content_hash, read_sources
from esm_index.cli import app
from esm_index.data import read_task
from esm_index.executors import DaskExecutor, LocalExecutor, make_executor
from esm_index.finetune import FinetuneConfig

QUICK = FinetuneConfig(epochs=1, learning_rate=1e-3)
ONE_CLASS = "text,label\ncat dog,a\nsnow rain,a\n"


@pytest.fixture
def sources(tasks, tmp_path):
    """A folder holding the five source task files and one that cannot be built (a single class)."""
    folder = tmp_path / "sources"
    folder.mkdir()
    for name, file in tasks.items():
        if name != "target":
            (folder / file.name).write_bytes(file.read_bytes())
    (folder / "one-class.csv").write_text(ONE_CLASS)
    return folder


def good_names(tasks):
    return sorted(name for name in tasks if name != "target")


def test_dask_and_local_builds_give_the_same_ranking(tiny_model, tasks, sources, tmp_path):
    specs = read_sources(sources)
    target = read_task(tasks["target"])
    rankings, weights = {}, {}
    for kind, executor in (("local", LocalExecutor()), ("dask", DaskExecutor(workers=2))):
        with ESMIndex.create(tmp_path / kind, base_model=str(tiny_model)) as index, executor:
            assert executor.slots == (1 if kind == "local" else 2)
            status = index.build(specs, executor, QUICK)
            rankings[kind] = index.query(target.texts, target.labels, candidates=None)
            weights[kind] = {name: index.store.get(name).arrays["esm.weight"] for name in good_names(tasks)}
        assert sorted(status.names("added")) == good_names(tasks)
        assert list(status.failed) == ["one-class"] and "only one class" in status.failed["one-class"]
        assert status.remaining == 0 and status.per_hour > 0
    assert [r.source for r in rankings["dask"]] == [r.source for r in rankings["local"]]
    np.testing.assert_allclose([r.score for r in rankings["dask"]], [r.score for r in rankings["local"]], rtol=1e-6)
    for name, weight in weights["local"].items():  # fine-tuning is seeded: the same ESM in any process
        np.testing.assert_allclose(weights["dask"][name], weight, atol=1e-5)


def test_failures_are_reported_and_stored_sources_kept(tiny_model, tasks, tmp_path):
    (tmp_path / "one.csv").write_text(ONE_CLASS)
    manifest = tmp_path / "manifest.jsonl"
    entries = [
        {"name": "af", "path": str(tasks["animals-food"]), "max_examples": 40, "seed": 3},
        {"name": "missing", "path": "nowhere.csv"},
        {"name": " bad name", "path": str(tasks["tools-weather"])},
        {"name": "one", "path": "one.csv", "text_column": "text", "label_column": "label"},
    ]
    manifest.write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    seen = []
    with ESMIndex.create(tmp_path / "index", base_model=str(tiny_model)) as index:
        index.add_source("kept", tasks["all-four"], finetune=QUICK)
        status = index.build(read_sources(manifest), finetune=QUICK,
                             progress=lambda s, name, result: seen.append((name, result, s.remaining)))
        assert status.names("added") == ["af"] and index.store.get("af").info["num_examples"] == 40
        assert set(status.failed) == {"missing", " bad name", "one"}
        assert "nowhere.csv: no such file" in status.failed["missing"]
        assert "invalid source name" in status.failed[" bad name"]
        assert "only one class" in status.failed["one"]
        assert seen == [(" bad name", "failed", 3), ("af", "added", 2), ("missing", "failed", 1), ("one", "failed", 0)]
        assert sorted(index.store.names()) == ["af", "kept"]
        again = index.build(read_sources(manifest), finetune=QUICK)
        assert again.names("unchanged") == ["af"] and len(again.failed) == 3 and again.processed == 3
        changed = index.build(read_sources(manifest), finetune=FinetuneConfig(epochs=0.5, learning_rate=1e-3))
        assert changed.names("replaced") == ["af"]


def test_read_sources_folder_and_manifests(tasks, sources, tmp_path):
    assert [s.name for s in read_sources(sources)] == sorted(good_names(tasks) + ["one-class"])
    manifest = tmp_path / "sub" / "manifest.json"
    manifest.parent.mkdir()
    manifest.write_text(json.dumps([{"name": "a", "path": "../a.csv", "regression": True, "finetuned": "model"},
                                    {"name": "b", "path": "/abs/b.tsv", "label_column": "y"}]))
    a, b = read_sources(manifest)
    assert Path(a.path) == tmp_path / "sub" / "../a.csv" and a.regression and Path(a.finetuned) == manifest.parent / "model"
    assert b.path == "/abs/b.tsv" and b.label_column == "y" and b.text_column is None


@pytest.mark.parametrize("content, message", [
    ([{"name": "a"}], "source 1: missing 'path'"),
    ([{"name": "a", "path": "a.csv", "colour": 1}], "unknown field"),
    ([{"name": "a", "path": "a.csv", "regression": "yes"}], "'regression' must be bool"),
    ([{"name": "a", "path": "a.csv", "max_examples": True}], "'max_examples' must be int"),
    ([{"name": "a", "path": "a.csv", "max_examples": 0}], "'max_examples' must be positive"),
    ([{"name": "a", "path": "a.csv"}, {"name": "a", "path": "b.csv"}], "more than one source named 'a'"),
    ([], "non-empty JSON list"),
    ({"name": "a", "path": "a.csv"}, "non-empty JSON list"),
    (["a.csv"], "source 1: expected a JSON object"),
])
def test_bad_manifests_are_refused(tmp_path, content, message):
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps(content))
    with pytest.raises(ESMIndexError, match=message):
        read_sources(manifest)


def test_bad_sources_and_executor_options_are_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "m.json").write_text("[{")
    for path, message in [(tmp_path, "no task files"), (tmp_path / "notes.txt", "not a folder of task files"),
                          (tmp_path / "m.json", "not valid JSON"), (tmp_path / "none.json", "no such file")]:
        with pytest.raises(ESMIndexError, match=message):
            read_sources(path)
    for args, message in [(("spark",), "unknown executor"), (("local", "tcp://h:8786"), "need the dask executor"),
                          (("dask", "tcp://h:8786", 4), "worker count"), (("dask", None, 0), "positive integer")]:
        with pytest.raises(ESMIndexError, match=message):
            make_executor(*args)


def test_cli_build_reports_failures_with_exit_code(tiny_model, tasks, sources, tmp_path):
    runner = CliRunner()
    path = tmp_path / "index"
    assert runner.invoke(app, ["init", str(path), "--base-model", str(tiny_model)]).exit_code == 0
    first = runner.invoke(app, ["build", str(path), str(sources), "--epochs", "0.5", "--json"])
    assert first.exit_code == 1, first.output
    report = json.loads(first.stdout)
    assert set(report) == {"total", "added", "replaced", "unchanged", "failed", "seconds", "sources_per_hour"}
    assert sorted(report["added"]) == good_names(tasks) and report["total"] == 6
    assert report["failed"][0]["source"] == "one-class" and "only one class" in report["failed"][0]["error"]
    assert "error: 1 of 6 sources failed: one-class" in first.stderr
    assert "] added all-four | done 1, failed 0, running 1 |" in first.stderr
    (sources / "one-class.csv").unlink()
    second = runner.invoke(app, ["build", str(path), str(sources), "--epochs", "0.5"])
    assert second.exit_code == 0, second.output
    assert "0 added, 0 replaced, 5 unchanged, 0 failed" in second.stdout
    wrong = runner.invoke(app, ["build", str(path), str(sources), "--scheduler", "tcp://h:8786"])
    assert wrong.exit_code == 1 and wrong.stderr.count("\n") == 1 and "need the dask executor" in wrong.stderr


def test_killed_build_keeps_committed_sources_and_resumes(tiny_model, tasks, sources, tmp_path):
    (sources / "one-class.csv").unlink()
    path = tmp_path / "index"
    ESMIndex.create(path, base_model=str(tiny_model)).close()
    command = [str(Path(sys.executable).with_name("esm-index")), "build", str(path), str(sources), "--epochs", "0.5"]
    env = {**os.environ, "ESM_INDEX_THREADS": "1"}
    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    for line in job.stderr:
        if "] added " in line:  # the first source is committed: kill the job as a scheduler would
            job.kill()
            break
    assert job.wait() < 0, "the build ended before it could be killed"
    with ESMIndex.open(path, readonly=True) as index:
        committed = sorted(index.store.names())
    assert 1 <= len(committed) < 5
    rerun = subprocess.run(command + ["--json"], capture_output=True, text=True, env=env)
    assert rerun.returncode == 0, rerun.stderr
    report = json.loads(rerun.stdout)
    assert sorted(report["unchanged"]) == committed
    assert sorted(report["added"] + report["unchanged"]) == good_names(tasks)
    with ESMIndex.open(path, readonly=True) as index:
        assert sorted(index.store.names()) == good_names(tasks)


def test_content_hash_sees_a_replaced_finetuned_model(tmp_path):
    data, model = tmp_path / "task.csv", tmp_path / "model"
    data.write_text("text,label\na,x\nb,y\n")
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights one")
    spec, settings = SourceSpec("s", str(data), finetuned=str(model)), BuildSettings("base", "mean", 8)
    before = content_hash(spec, settings)
    assert content_hash(spec, settings) == before
    (model / "model.safetensors").write_bytes(b"weights two, longer")
    assert content_hash(spec, settings) != before
