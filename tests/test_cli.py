"""Every CLI command, its --json output, and one-line errors that leave the index unchanged."""

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from esm_index import ESMIndex
from esm_index.cli import app

runner = CliRunner()


def run(*args, ok=True):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert (result.exit_code == 0) == ok, result.output + result.stderr
    return result


@pytest.fixture
def index(built_index, tmp_path):
    shutil.copytree(built_index, tmp_path / "index")
    return tmp_path / "index"


def generation(path):
    with ESMIndex.open(path, readonly=True) as opened:
        return opened.meta["generation"], sorted(s["name"] for s in opened.sources())


@pytest.mark.parametrize("command", ["init", "add", "build", "query", "list", "info", "remove", "rename", "verify", "import-esm", "export-esm", "serve"])
def test_every_command_has_help(command):
    assert "Usage" in run(command, "--help").output


def test_init_add_list_info_remove(tmp_path, tiny_model, tasks):
    path = tmp_path / "fresh"
    run("init", path, "--base-model", tiny_model)
    run("add", path, tasks["animals-food"], "--name", "af", "--epochs", "0.5", "--quiet")
    run("add", path, tasks["tools-weather"], "--name", "tw", "--epochs", "0.5", "--fit", "adamw", "--quiet")
    listed = json.loads(run("list", path, "--json").stdout)
    assert [s["name"] for s in listed["sources"]] == ["af", "tw"]
    assert listed["sources"][1]["esm"]["fit"]["method"] == "adamw"
    assert "af" in run("list", path).stdout
    info = json.loads(run("info", path, "--json").stdout)
    assert info["sources"] == 2 and info["dim"] == 32 and info["pooling"] == "pooler"
    run("rename", path, "af", "animals-food")
    run("remove", path, "tw")
    assert generation(path)[1] == ["animals-food"]


def test_query_json_and_table(index, tasks):
    result = json.loads(run("query", index, tasks["target"], "--json", "--top-k", "3", "--candidates", "all").stdout)
    assert [r["rank"] for r in result["results"]] == [1, 2, 3]
    assert result["pool"] == 5 and result["candidates"] == 5
    assert set(result["timings"]) >= {"embed", "statistics", "prefilter", "rescore"}
    table = run("query", index, tasks["target"], "--top-k", "2", "--quiet").stdout
    assert result["results"][0]["source"] in table and "ESM-LogME" in table


def test_query_with_precomputed_embeddings(index, tasks, tmp_path):
    from esm_index.data import read_task

    target = read_task(tasks["target"])
    with ESMIndex.open(index, readonly=True) as opened:
        X = opened.encoder.embed(target.texts)
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "y.npy", target.labels)
    by_file = json.loads(run("query", index, tasks["target"], "--json", "--candidates", "all").stdout)
    by_npy = json.loads(run("query", index, "--embeddings", tmp_path / "X.npy", "--labels", tmp_path / "y.npy",
                            "--json", "--candidates", "all").stdout)
    assert [r["source"] for r in by_file["results"]] == [r["source"] for r in by_npy["results"]]


def bad_files(tmp_path, tasks):
    one_class = tmp_path / "one.csv"
    one_class.write_text("text,label\nhello cat,a\nhello dog,a\n")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    return {
        "missing file": ([tmp_path / "nope.csv"], "no such file"),
        "missing column": ([tasks["target"], "--label-column", "topic"], "no label column 'topic'"),
        "one class": ([one_class], "only one class"),
        "empty file": ([empty], "empty file"),
    }


@pytest.mark.parametrize("case", ["missing file", "missing column", "one class", "empty file"])
def test_bad_source_files_fail_in_one_line_and_change_nothing(index, tasks, tmp_path, case):
    args, message = bad_files(tmp_path, tasks)[case]
    before = generation(index)
    result = run("add", index, *args, "--name", "bad", ok=False)
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr
    assert generation(index) == before


@pytest.mark.parametrize("case", ["missing file", "missing column", "one class", "empty file"])
def test_bad_target_files_fail_in_one_line(index, tasks, tmp_path, case):
    args, message = bad_files(tmp_path, tasks)[case]
    result = run("query", index, *args, ok=False)
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr


def test_unknown_source_and_bad_options(index, tasks, tmp_path):
    before = generation(index)
    assert "no source named 'nope'" in run("remove", index, "nope", ok=False).stderr
    assert "'all'" in run("query", index, tasks["target"], "--candidates", "many", ok=False).stderr
    assert "'all'" in run("query", index, tasks["target"], "--candidates", "0", ok=False).stderr
    assert "not an esm-index index" in run("list", tmp_path, ok=False).stderr
    assert "either DATA or both" in run("query", index, tasks["target"], "--labels", tmp_path / "y.npy", ok=False).stderr
    assert generation(index) == before
