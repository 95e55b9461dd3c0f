"""The Python API: create, add, query (texts and embeddings), remove, rename, reopen."""

import shutil

import numpy as np
import pytest

from esm_index import ESMIndex, ESMIndexError, Ranking
from esm_index.data import read_task


@pytest.fixture
def index(built_index, tmp_path):
    """A private, writable copy of the session's built index."""
    shutil.copytree(built_index, tmp_path / "index")
    with ESMIndex.open(tmp_path / "index") as opened:
        yield opened


def test_query_ranks_every_source_with_finite_scores(index, tasks):
    target = read_task(tasks["target"])
    ranking = index.query(target.texts, target.labels, top_k=10, candidates=None)
    assert isinstance(ranking, Ranking)
    assert sorted(r.source for r in ranking) == sorted(n for n in tasks if n != "target")
    scores = [r.score for r in ranking]
    assert scores == sorted(scores, reverse=True) and np.isfinite(scores).all()
    assert [r.rank for r in ranking] == list(range(1, 6))
    as_dict = ranking.to_dict()
    assert set(as_dict) >= {"results", "pool", "candidates", "timings"}
    assert as_dict["pool"] == 5 and as_dict["candidates"] == 5
    assert set(as_dict["timings"]) >= {"embed", "statistics", "prefilter", "rescore"}


def test_query_embeddings_equals_query_on_texts(index, tasks):
    target = read_task(tasks["target"])
    X = index.encoder.embed(target.texts)
    by_texts = index.query(target.texts, target.labels, candidates=None)
    by_embeddings = index.query_embeddings(X, target.labels, candidates=None)
    assert [r.source for r in by_texts] == [r.source for r in by_embeddings]
    np.testing.assert_allclose([r.score for r in by_texts], [r.score for r in by_embeddings], rtol=1e-6)


def test_prefilter_candidates_are_rescored_exactly(index, tasks):
    target = read_task(tasks["target"])
    full = {r.source: r.score for r in index.query(target.texts, target.labels, candidates=None)}
    ranking = index.query(target.texts, target.labels, candidates=2)
    assert ranking.candidates == 2 and len(ranking) == 2 and ranking.pool == 5
    for result in ranking:
        assert result.score == pytest.approx(full[result.source], rel=1e-9)


def test_remove_rename_and_replace(index, tasks):
    index.remove("all-four")
    assert "all-four" not in index and len(index) == 4
    index.rename("food-weather", "fw")
    assert "fw" in index and "food-weather" not in index
    assert index.add_source("fw", tasks["animals-food"]) == "replaced"
    assert len(index) == 4
    target = read_task(tasks["target"])
    assert sorted(r.source for r in index.query(target.texts, target.labels)) == sorted(
        ["animals-food", "tools-weather", "animals-tools", "fw"])


def test_unknown_source_and_readonly_writes_are_refused(index, built_index):
    with pytest.raises(ESMIndexError, match="no source named 'nope'"):
        index.remove("nope")
    with ESMIndex.open(built_index, readonly=True) as opened:
        with pytest.raises(ESMIndexError, match="read-only"):
            opened.rename("all-four", "x")
        assert len(opened) == 5


def test_create_refuses_existing_index_and_bad_names(built_index, tiny_model, tmp_path):
    with pytest.raises(ESMIndexError, match="already exists"):
        ESMIndex.create(built_index, base_model=str(tiny_model))
    with ESMIndex.create(tmp_path / "new", base_model=str(tiny_model)) as index:
        for bad in ("", "\u4e2d" * 200):  # empty; 200 characters but 600 bytes, beyond an LMDB key
            with pytest.raises(ESMIndexError, match="invalid source name"):
                index.add_source(bad, tmp_path / "x.csv")
    with pytest.raises(ESMIndexError, match="unknown pooling 'bogus'"):
        ESMIndex.create(tmp_path / "other", base_model="elsewhere/model", dim=8, pooling="bogus")
    assert not (tmp_path / "other").exists()
    with pytest.raises(ESMIndexError, match="not an esm-index index"):
        ESMIndex.open(tmp_path)


def test_records_carry_fit_quality_and_summary_statistics(index):
    record = index.store.get("all-four")
    assert record.arrays["esm.weight"].shape == (32, 32)
    assert record.arrays["stats.mapped_mean"].shape == (32,)
    fit = record.info["esm"]["fit"]
    assert fit["method"] == "lstsq" and -1 < fit["heldout_r2"] <= 1
    assert len(record.info["content_hash"]) == 64
