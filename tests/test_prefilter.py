"""The prefilter: sketches from W alone, stage-2 LogME through the basis, FAISS index types, the scale pool."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from esm_index import ESMIndex, ESMIndexError
from esm_index.esm import ESM
from esm_index.evaluate import rank_correlation, recall_at_k
from esm_index.logme import TargetStats, encode_labels, logme_from_stats, logme_score
from esm_index.prefilter import (SKETCH_KEY, VECTOR_KEY, Prefilter, PrefilterConfig, TargetQuery, faiss_index,
                                 project, search_vector, sketch)

DIM = 24


def load_pool_module():
    spec = importlib.util.spec_from_file_location("pool", Path(__file__).parents[1] / "tools" / "pool.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def structured_maps(count, dim=DIM, seed=0):
    """Maps that stretch different directions by different amounts, as fine-tuned ESMs do."""
    rng = np.random.default_rng(seed)
    W = np.eye(dim) + 0.3 * rng.standard_normal((count, dim, dim)) / np.sqrt(dim)
    W *= 1 + 2 * rng.random((count, 1, dim))  # column scales: which input directions each map amplifies
    return W.astype(np.float32), (0.1 * rng.standard_normal((count, dim))).astype(np.float32)


def target(n=120, dim=DIM, classes=3, seed=1):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    X = rng.standard_normal((n, dim)) * np.linspace(2, 0.2, dim) + 1.5 * rng.standard_normal((classes, dim))[labels]
    return X, labels


def test_sketch_is_the_map_seen_through_the_basis():
    config = PrefilterConfig(rank=4, sketch_rank=10)
    W, b = structured_maps(3)
    P = config.sketch_basis(DIM)
    assert P.shape == (DIM + 1, 10) and np.allclose(P.T @ P, np.eye(10))
    packed = sketch(project(W, b, P))
    assert packed.shape == (3, 55) and packed.dtype == np.float32
    T = np.zeros((3, 10, 10))
    rows, cols = np.triu_indices(10)
    T[:, rows, cols] = packed
    Wt = np.concatenate([W, b[:, :, None]], axis=2).astype(np.float64)
    np.testing.assert_allclose(np.swapaxes(T, 1, 2) @ T, P.T @ np.swapaxes(Wt, 1, 2) @ Wt @ P, rtol=1e-4, atol=1e-4)
    # the stage-1 vector is the leading 4 x 4 block of P^T M P, normalised, as a trace inner product
    vector = search_vector(packed, 4)
    assert vector.shape == (3, 10) and np.allclose(np.linalg.norm(vector, axis=1), 1, atol=1e-6)
    S = (P[:, :4].T @ np.swapaxes(Wt, 1, 2) @ Wt @ P[:, :4])
    np.testing.assert_allclose(vector[0] @ vector[1], np.sum(S[0] * S[1]) / np.linalg.norm(S[0]) / np.linalg.norm(S[1]),
                               rtol=1e-4)


def test_stage_two_is_logme_of_the_target_seen_through_the_basis():
    config = PrefilterConfig(rank=4, sketch_rank=12)
    W, b = structured_maps(4)
    X, labels = target()
    Y = encode_labels(labels, False)
    query = TargetQuery(X, Y, False, config)
    scores = query.scores(sketch(project(W, b, config.sketch_basis(DIM))))
    P = config.sketch_basis(DIM)
    Xt = np.hstack([X, np.ones((len(X), 1))])
    for k in range(4):
        WP = np.hstack([W[k], b[k][:, None]]).astype(np.float64) @ P
        features = Xt @ P @ np.linalg.cholesky(WP.T @ WP)  # kernel X~P (P^T M P) P^T X~^T, r columns
        assert scores[k] == pytest.approx(logme_score(features, labels), rel=1e-4, abs=1e-4)


def test_stage_two_with_a_complete_basis_ranks_like_the_exact_scan():
    config = PrefilterConfig(sketch_rank=DIM + 1)  # a complete basis of the (d+1)-space of [x, 1]
    W, b = structured_maps(40)
    X, labels = target()
    exact = logme_from_stats(W, b, TargetStats.from_embeddings(X, labels))
    approx = TargetQuery(X, encode_labels(labels, False), False, config).scores(
        sketch(project(W, b, config.sketch_basis(DIM))))
    assert rank_correlation(exact, approx)["spearman"] > 0.98
    assert recall_at_k(exact, np.argsort(-approx)[:10], 5) == 1.0


def test_faiss_index_is_exhaustive_while_small_and_ivf_beyond():
    import faiss

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, 16))  # clustered, like sketches of related sources
    vectors = (centres[rng.integers(0, 40, 3000)] + 0.3 * rng.standard_normal((3000, 16))).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(3000, dtype=np.int64) * 7
    flat = faiss_index(vectors, ids, PrefilterConfig(exact_max=5000))
    ivf = faiss_index(vectors, ids, PrefilterConfig(exact_max=1000, nprobe=16))
    assert isinstance(faiss.downcast_index(flat.index), faiss.IndexFlatIP)
    assert isinstance(ivf, faiss.IndexIVFFlat) and ivf.nlist == int(4 * np.sqrt(3000)) and ivf.nprobe == 16
    query = vectors[:20] + 0.1 * rng.standard_normal((20, 16)).astype(np.float32)
    exact = Prefilter(flat, 0)
    approx = Prefilter(ivf, 0)
    overlap = [len(set(exact.search(q, 50)) & set(approx.search(q, 50))) / 50 for q in query]
    assert np.mean(overlap) > 0.8 and all(i % 7 == 0 for i in approx.search(query[0], 50))
    ivf.nprobe = ivf.nlist  # every list visited: the exhaustive answer
    assert all(set(exact.search(q, 50)) == set(approx.search(q, 50)) for q in query)


def test_ivf_prefilter_round_trips_with_its_search_settings(tmp_path):
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((2000, 8)).astype(np.float32)
    saved = Prefilter(faiss_index(vectors, np.arange(2000, dtype=np.int64), PrefilterConfig(exact_max=100, nprobe=5)), 7)
    saved.save(tmp_path)
    loaded = Prefilter.load(tmp_path)
    assert loaded.generation == 7 and loaded.index.nprobe == 5 and loaded.index.ntotal == 2000
    assert loaded.search(vectors[3], 10) == saved.search(vectors[3], 10)


def test_index_records_carry_both_stages_and_queries_report_them(tmp_path):
    W, b = structured_maps(30)
    with ESMIndex.create(tmp_path / "index", base_model="base", dim=DIM,
                         prefilter=PrefilterConfig(rank=4, sketch_rank=12, shortlist=10)) as index:
        for k in range(30):
            index.add_esm(f"s{k}", ESM(W[k], b[k]))
        record = index.store.get("s3")
        assert record.arrays[VECTOR_KEY].shape == (10,) and record.arrays[SKETCH_KEY].shape == (78,)
        X, labels = target()
        full = {r.source: r.score for r in index.query_embeddings(X, labels, top_k=30, candidates=None)}
        ranking = index.query_embeddings(X, labels, top_k=5, candidates=5)
        assert ranking.candidates == 5 and ranking.pool == 30
        assert {"statistics", "prefilter", "shortlist", "rescore"} <= set(ranking.timings)
        for result in ranking:
            assert result.score == pytest.approx(full[result.source], rel=1e-9)


def test_prefilter_settings_are_checked():
    for bad in ({"rank": 0}, {"sketch_rank": -1}, {"shortlist": -1}, {"exact_max": -5}, {"nprobe": 0},
                {"rank": 1.5}):
        with pytest.raises(ESMIndexError, match="prefilter"):
            PrefilterConfig(**bad)


def test_pool_sketches_equal_those_of_the_materialised_maps():
    pool_module = load_pool_module()
    W, b = structured_maps(6)
    pool = pool_module.DerivedPool.derive([f"r{k}" for k in range(6)], W, b, 50, seed=3)
    assert len(pool) == 50 and pool.name(2) == "r2" and pool.name(20) == "mix20"
    assert pool.recipe(2) == {"r2": 1.0} and sum(pool.recipe(20).values()) == pytest.approx(1, abs=1e-3)
    np.testing.assert_allclose(pool.mix.sum(1), 1, rtol=1e-6)
    Wm, bm = pool.materialise(np.arange(6))
    np.testing.assert_array_equal(Wm, W)  # the real maps come first, unchanged
    P = PrefilterConfig(sketch_rank=8).sketch_basis(DIM)
    ids = np.arange(50)
    direct = sketch(project(*pool.materialise(ids), P))
    by_linearity = pool.sketches(P, batch=16)
    # T is unique up to the signs of its rows: compare T^T T
    rows, cols = np.triu_indices(8)
    def gram(packed):
        T = np.zeros((len(packed), 8, 8))
        T[:, rows, cols] = packed
        return np.swapaxes(T, 1, 2) @ T
    np.testing.assert_allclose(gram(by_linearity), gram(direct), rtol=1e-4, atol=1e-4)
