"""End to end on the real packaged MiniLM, through the installed `esm-index` console script."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "esm-index"


def esm_index(*args):
    result = subprocess.run([str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.slow
def test_minilm_build_and_query(tmp_path, tasks):
    index = tmp_path / "minilm"
    esm_index("init", index)
    for name in ("animals-food", "tools-weather", "all-four"):
        esm_index("add", index, tasks[name], "--name", name, "--epochs", "1", "--max-examples", "40", "--quiet")
    info = json.loads(esm_index("info", index, "--json").stdout)
    assert info["dim"] == 384 and info["pooling"] == "mean" and info["sources"] == 3
    ranking = json.loads(esm_index("query", index, tasks["target"], "--json", "--candidates", "all").stdout)
    assert sorted(r["source"] for r in ranking["results"]) == ["all-four", "animals-food", "tools-weather"]
    assert ranking["pool"] == 3 and ranking["candidates"] == 3 and not ranking["failed"]
    table = esm_index("query", index, tasks["target"], "--top-k", "1").stdout
    assert ranking["results"][0]["source"] in table


@pytest.mark.slow
def test_readme_query_on_the_default_index(tmp_path):
    """The README's first command, on a copy of the shipped default index and its example target."""
    shipped = ROOT / "indexes" / "default"
    if not (shipped / "data.mdb").is_file():
        pytest.fail("indexes/default is missing: the README's first command cannot work")
    shutil.copytree(shipped, tmp_path / "default")
    result = json.loads(esm_index("query", tmp_path / "default", ROOT / "indexes" / "default-target.csv",
                                  "--top-k", "5", "--json").stdout)
    assert len(result["results"]) == 5 and result["pool"] >= 12
