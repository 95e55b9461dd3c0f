"""The prefilter: log moments from W alone, the linearised evidence and its basis, FAISS index types, the scale pool."""

import numpy as np
import pytest
from conftest import load_tool

from esm_index import ESMIndex, ESMIndexError
from esm_index.esm import ESM
from esm_index.evaluate import rank_correlation, recall_at_k
from esm_index.logme import TargetStats, encode_labels, logme_from_stats, logme_score
from esm_index.prefilter import (INDEX_FILE, LOG_FLOOR, Basis, Prefilter, PrefilterConfig, _pack, _unpack,
                                 evidence_gradient, exp_chain, faiss_index, log_moments)
from esm_index.query import rank

DIM = 24


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


def exact_and_linearised(W, b, X, labels):
    """Exact ESM-LogME of each map, and its evidence linearised in log M and the log scale at the pool's
    mean, at full size."""
    exact = logme_from_stats(W, b, TargetStats.from_embeddings(X, labels))
    moments = log_moments(W, b)
    packed, scales = moments[:, :-1], moments[:, -1]
    values, vectors = np.linalg.eigh(_unpack(packed.mean(0, dtype=np.float64), DIM + 1))
    gradient = evidence_gradient(X, encode_labels(labels, False), np.exp(values), vectors)
    along_scale = max(DIM - len(X), 0) / 2  # n dE/ds: LogME of d features is scale-free once n >= d
    return exact, packed @ _pack(exp_chain(gradient, values, vectors)) + along_scale * scales


def test_log_moments_are_the_log_of_the_normalised_map_and_the_log_scale():
    W, b = structured_maps(2)
    moments = log_moments(W, b)
    assert moments.shape == (2, (DIM + 1) * (DIM + 2) // 2 + 1) and moments.dtype == np.float32
    packed, scales = moments[:, :-1], moments[:, -1]
    tripled = log_moments(3 * W, 3 * b)  # M nine times as large: the same log map, the scale up by log 9
    np.testing.assert_allclose(tripled[:, :-1], packed, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tripled[:, -1], scales + np.log(9), rtol=1e-6)
    Wt = np.concatenate([W[0], b[0, :, None]], axis=1).astype(np.float64)
    M = Wt.T @ Wt
    assert scales[0] == pytest.approx(np.log(np.linalg.norm(M)), rel=1e-6)
    values, vectors = np.linalg.eigh(_unpack(packed[0].astype(np.float64), DIM + 1))
    np.testing.assert_allclose((vectors * np.exp(values)) @ vectors.T, M / np.linalg.norm(M) + LOG_FLOOR * np.eye(DIM + 1),
                               atol=1e-6)
    A, B = (_unpack(p.astype(np.float64), DIM + 1) for p in packed)
    assert packed[0] @ packed[1] == pytest.approx(np.sum(A * B), rel=1e-5)  # packing keeps inner products


def features(Xt, M):
    values, vectors = np.linalg.eigh(M)
    return Xt @ (vectors * np.sqrt(np.clip(values, 0, None)))


@pytest.mark.parametrize("n, repeated, dead", [
    (120, 0, 0), (15, 0, 0),  # n > d, and n < d where alpha's motion adds to the gradient
    (15, 5, 0), (120, 0, 3),  # rank-deficient F (repeated examples, all-zero output features): counted zeros
])
def test_evidence_gradient_is_the_derivative_of_converged_logme(n, repeated, dead, monkeypatch):
    import esm_index.logme as logme

    X, labels = target(n=n)
    X[:repeated], labels[:repeated] = X[repeated : 2 * repeated], labels[repeated : 2 * repeated]
    Y = encode_labels(labels, False)
    Xt = np.hstack([X, np.ones((n, 1))])
    rng = np.random.default_rng(2)
    root = np.eye(DIM, DIM + 1) + 0.2 * rng.standard_normal((DIM, DIM + 1))  # an ESM's W~: M = W~^T W~, rank d
    root[:dead] = 0.0
    direction = rng.standard_normal((DIM, DIM + 1))
    values, vectors = np.linalg.eigh(root.T @ root)
    H = root.T @ direction + direction.T @ root  # dM along W~ + h direction
    # the fixed point iterated to convergence, for the gradient and for LogME (thuml stops at a 1e-3
    # tolerance, which moves the evidence by more than a finite difference resolves)
    monkeypatch.setattr(logme, "MAX_ITERATIONS", 2000)
    monkeypatch.setattr(logme, "TOLERANCE", 1e-14)
    gradient = np.sum(evidence_gradient(X, Y, values, vectors) * H)
    step = 1e-5
    change = logme_score(Xt @ (root + step * direction).T, labels) - logme_score(Xt @ (root - step * direction).T, labels)
    assert gradient == pytest.approx(n * change / (2 * step), rel=1e-4)


def test_exp_chain_is_the_derivative_through_the_matrix_exponential():
    X, labels = target()
    Y, n = encode_labels(labels, False), len(X)
    Xt = np.hstack([X, np.ones((n, 1))])
    rng = np.random.default_rng(3)
    spectrum = np.linspace(-6, 0, DIM + 1)
    spectrum[:3] = -4.0  # a repeated eigenvalue: the divided difference's limit
    Q, _ = np.linalg.qr(rng.standard_normal((DIM + 1, DIM + 1)))
    L = (Q * spectrum) @ Q.T
    H = rng.standard_normal((DIM + 1, DIM + 1))
    H = (H + H.T) / 2
    values, vectors = np.linalg.eigh(L)
    gradient = np.sum(exp_chain(evidence_gradient(X, Y, np.exp(values), vectors), values, vectors) * H)

    def logme_at(L):
        values, vectors = np.linalg.eigh(L)
        return logme_score(features(Xt, (vectors * np.exp(values)) @ vectors.T), labels)

    step = 1e-4
    assert gradient == pytest.approx(n * (logme_at(L + step * H) - logme_at(L - step * H)) / (2 * step), rel=0.05)


def test_basis_is_exact_for_small_pools_and_search_follows_the_linearised_evidence():
    W, b = structured_maps(30)
    moments = log_moments(W, b)
    packed, scales = moments[:, :-1], moments[:, -1]
    basis = Basis.fit(moments, rank=64)
    assert basis.components.shape == (29, packed.shape[1])  # 30 maps span 29 directions around their mean
    coordinates = basis.coordinates(moments)
    np.testing.assert_allclose(basis.mean + coordinates[:, :-1] @ basis.components, packed, atol=1e-5)
    np.testing.assert_allclose(coordinates[:, -1], scales - scales.mean(), atol=1e-5)  # the scale, centred
    for n in (120, 15):  # n > d, and n < d where the scale matters
        X, labels = target(n=n)
        _, linearised = exact_and_linearised(W, b, X, labels)
        query = basis.query(X, encode_labels(labels, False))
        assert rank_correlation(coordinates @ query, linearised)["spearman"] > 0.999
    assert Basis.fit(moments[:1].repeat(3, 0), rank=8).components.shape == (1, packed.shape[1])  # no spread


def test_linearised_evidence_finds_the_exact_winners():
    W, b = structured_maps(60)
    for seed in (1, 2, 3):
        X, labels = target(seed=seed)
        exact, linearised = exact_and_linearised(W, b, X, labels)
        assert rank_correlation(exact, linearised)["spearman"] > 0.8
        assert recall_at_k(exact, np.argsort(-linearised)[:20], 5) == 1.0  # chance: 1/3


@pytest.mark.parametrize("n", [120, DIM, DIM - 1, 12])
def test_the_first_pass_weighs_the_scale_only_for_targets_with_fewer_examples_than_dimensions(n, monkeypatch):
    import esm_index.logme as logme

    W, b = structured_maps(20)
    W, b = np.concatenate([W, 1.5 * W]), np.concatenate([b, 1.5 * b])  # each map, and a copy 1.5 times as large
    X, labels = target(n=n)
    along_scale = Basis.fit(log_moments(W, b), rank=64).query(X, encode_labels(labels, False))[-1]
    assert along_scale == max(DIM - n, 0) / 2
    # the same slope from converged LogME: M grows by 1.5^2, s by 2 log 1.5
    monkeypatch.setattr(logme, "MAX_ITERATIONS", 2000)
    monkeypatch.setattr(logme, "TOLERANCE", 1e-14)
    exact, linearised = exact_and_linearised(W, b, X, labels)
    slope = n * (exact[20:] - exact[:20]) / (2 * np.log(1.5))
    np.testing.assert_allclose(slope, along_scale, rtol=0.01, atol=5e-3)  # thuml's ridge 1e-5 bends it slightly
    if n < DIM - 1:  # thuml's d/2 log alpha: the larger copy scores higher, and the first pass knows it
        assert (linearised[20:] > linearised[:20]).all()
        assert rank_correlation(exact, linearised)["spearman"] > 0.8


def test_faiss_index_is_exhaustive_while_small_and_ivf_beyond():
    import faiss

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, 16))  # clustered, like coordinates of related sources
    vectors = (centres[rng.integers(0, 40, 3000)] + 0.3 * rng.standard_normal((3000, 16))).astype(np.float32)
    ids = np.arange(3000, dtype=np.int64) * 7
    flat = faiss_index(vectors, ids, PrefilterConfig(exact_max=5000))
    ivf = faiss_index(vectors, ids, PrefilterConfig(exact_max=1000, nprobe=16))
    assert isinstance(faiss.downcast_index(flat.index), faiss.IndexFlatIP)
    assert isinstance(ivf, faiss.IndexIVFFlat) and ivf.nlist == 3000 // 39  # 4 sqrt(N) lists, each of >= 39 vectors and ivf.nprobe == 16
    assert faiss_index(vectors[:0], ids[:0], PrefilterConfig()) is None
    query = vectors[:20] + 0.1 * rng.standard_normal((20, 16)).astype(np.float32)
    _, exact = flat.search(query, 50)
    _, approx = ivf.search(query, 50)
    assert np.mean([len(set(e) & set(a)) / 50 for e, a in zip(exact, approx)]) > 0.8 and (approx % 7 == 0).all()
    ivf.nprobe = ivf.nlist  # every list visited: the exhaustive answer
    assert all(set(e) == set(a) for e, a in zip(exact, ivf.search(query, 50)[1]))


def test_ivf_visits_as_many_lists_as_the_screen_needs(tmp_path):
    W, b = structured_maps(80)
    X, labels = target()
    Y = encode_labels(labels, False)
    with index_of(tmp_path / "index", W, b, exact_max=10, nprobe=1) as index:
        prefilter = index.prefilter()
        assert prefilter.index.nlist == 2 and prefilter.index.nprobe == 1  # one list holds about half the pool
        ids, _ = prefilter.search(X, Y, 60)
        linear = prefilter.vectors @ prefilter.basis.query(X, Y)
        assert set(ids) == set(prefilter.ids[np.argsort(-linear)[:60]])


def index_of(path, W, b, **config):
    index = ESMIndex.create(path, base_model="base", dim=DIM, prefilter=PrefilterConfig(**config))
    for k in range(len(W)):
        index.add_esm(f"s{k}", ESM(W[k], b[k]))
    return index


def test_queries_rescore_the_prefilter_candidates_exactly(tmp_path):
    W, b = structured_maps(40)
    X, labels = target()
    with index_of(tmp_path / "index", W, b) as index:
        assert not any(key.startswith("prefilter") for key in index.store.get("s3").arrays)  # derived data only
        full = {r.source: r.score for r in index.query_embeddings(X, labels, top_k=40, candidates=None)}
        ranking = index.query_embeddings(X, labels, top_k=5, candidates=15)
        assert ranking.candidates == 15 and ranking.pool == 40
        assert {"statistics", "prefilter", "rescore"} <= set(ranking.timings)
        assert [r.source for r in ranking] == sorted(full, key=full.get, reverse=True)[:5]  # the exact top 5 kept
        for result in ranking:
            assert result.score == pytest.approx(full[result.source], rel=1e-9)
        prefilter = index.prefilter()
        assert prefilter.vectors.shape == (40, 40) and prefilter.basis.trained_on == 40  # 39 directions and the scale


def test_stale_prefilter_projects_new_sources_and_retrains_when_the_pool_doubles(tmp_path):
    W, b = structured_maps(90)
    with index_of(tmp_path / "index", W[:30], b[:30], rank=16) as index:
        first = index.prefilter()
        for k in range(30, 50):
            index.add_esm(f"s{k}", ESM(W[k], b[k]))
        index.remove("s0")
        grown = index.prefilter()
        assert grown.basis.trained_on == 30 and grown.vectors.shape == (49, 17)  # projected on the same basis
        np.testing.assert_array_equal(grown.basis.components, first.basis.components)
        kept = np.isin(first.ids, grown.ids)
        np.testing.assert_array_equal(grown.vectors[np.isin(grown.ids, first.ids)], first.vectors[kept])
        again = Prefilter.build(index.store, previous=grown, reuse=False)  # what verify recomputes
        np.testing.assert_allclose(again.vectors, grown.vectors, atol=1e-5)
        assert Prefilter.load(index.path).generation == index.store.generation
        for k in range(50, 90):
            index.add_esm(f"s{k}", ESM(W[k], b[k]))
        assert index.prefilter().basis.trained_on == 89  # 89 >= 2 x 30 sources: retrained on all of them
        assert index.verify().ok
    with ESMIndex.create(tmp_path / "capped", base_model="base", dim=DIM,
                         prefilter=PrefilterConfig(train_max=20)) as index:
        for k in range(60):
            index.add_esm(f"s{k}", ESM(W[k], b[k]))
        assert index.prefilter().basis.trained_on == 20  # a seeded sample of train_max sources


def test_prefilter_file_round_trips_and_a_foreign_file_means_rebuild(tmp_path):
    W, b = structured_maps(12)
    with index_of(tmp_path / "index", W, b, exact_max=5, nprobe=2) as index:
        built = index.prefilter()
        assert built.index.nprobe == 2  # IVF beyond exact_max, its search setting saved with it
        loaded = Prefilter.load(index.path)
        np.testing.assert_array_equal(loaded.vectors, built.vectors)
        assert loaded.index.nprobe == 2 and loaded.basis.trained_on == 12 and loaded.basis.scale == built.basis.scale
        X, labels = target()
        Y = encode_labels(labels, False)
        ids, scores = built.search(X, Y, 4)
        assert len(ids) == 4 and (np.diff(scores) <= 0).all()
        np.testing.assert_array_equal(loaded.search(X, Y, 4)[0], ids)
        (index.path / INDEX_FILE).write_bytes(b"not a prefilter")
        assert Prefilter.load(index.path) is None
        np.savez(index.path / INDEX_FILE, generation=built.generation, ids=built.ids, vectors=built.vectors)
        assert Prefilter.load(index.path) is None  # an earlier kind of coordinates (no "kind"): rebuilt
        arrays = dict(np.load(index.path / INDEX_FILE))
        np.savez(index.path / INDEX_FILE, **arrays, kind="log-moments")
        assert Prefilter.load(index.path) is None  # the kind before the scale coordinate: rebuilt
        np.testing.assert_array_equal(index.prefilter().search(X, Y, 4)[0], ids)
    with ESMIndex.create(tmp_path / "empty", base_model="base", dim=DIM) as empty:
        assert len(empty.prefilter().search(X, Y, 3)[0]) == 0


def test_calibrated_first_pass_ranks_by_the_curvature_it_is_fitted_to(tmp_path):
    W, b = structured_maps(80)
    X, labels = target(n=10)  # fewer examples than dimensions
    Y = encode_labels(labels, False)
    with index_of(tmp_path / "index", W, b) as index:
        prefilter = index.prefilter()
        linear = prefilter.vectors.astype(np.float64) @ prefilter.basis.query(X, Y).astype(np.float64)
        truth = 2.0 - 0.5 * linear + 3.0 * prefilter.radii  # the slope reversed, the curvature dominant
        sample = prefilter.calibration_sample(12)
        exact = truth[np.searchsorted(prefilter.ids, sample)]
        ids, _ = prefilter.calibrated_search(X, Y, 10, sample, exact)
        np.testing.assert_array_equal(ids, prefilter.ids[np.argsort(-truth)[:10]])
        plain, _ = prefilter.search(X, Y, 10)
        assert recall_at_k(truth, np.searchsorted(prefilter.ids, plain), 5) < 0.5
        unusable = np.full(len(sample), np.nan)
        unusable[:3] = exact[:3]
        np.testing.assert_array_equal(prefilter.calibrated_search(X, Y, 10, sample, unusable)[0], plain)
        with pytest.raises(ESMIndexError, match="must be positive"):
            prefilter.calibrated_search(X, Y, 0, sample, exact)


def test_calibration_sample_takes_the_rim_and_spreads_inward(tmp_path):
    W, b = structured_maps(40)
    with index_of(tmp_path / "index", W, b) as index:
        prefilter = index.prefilter()
        sample = prefilter.calibration_sample(10)
        assert len(sample) == 10 and np.all(np.diff(sample) > 0)
        outermost = prefilter.ids[np.argsort(-prefilter.radii)[:5]]
        assert set(outermost) <= set(sample)
        assert prefilter.ids[np.argmin(prefilter.radii)] in sample  # the spread reaches the centre
        np.testing.assert_array_equal(prefilter.calibration_sample(40), prefilter.ids)


@pytest.mark.parametrize("n, calibration, calibrated", [
    (10, 0, False), (10, 16, True), (20, 16, True), (DIM - 1, 16, True),  # n < d = 24: calibrated
    (DIM, 16, False), (30, 16, False),
])
def test_small_targets_spend_part_of_the_budget_on_calibration(tmp_path, monkeypatch, n, calibration, calibrated):
    W, b = structured_maps(80)
    X, labels = target(n=n)
    calls = []
    real = Prefilter.calibrated_search
    monkeypatch.setattr(Prefilter, "calibrated_search", lambda self, *args: calls.append(1) or real(self, *args))
    with index_of(tmp_path / "index", W, b, calibration=calibration, screen=6.5, anchors=20, local_rank=2) as index:
        full = {r.source: r.score for r in index.query_embeddings(X, labels, top_k=80, candidates=None)}
        ranking = index.query_embeddings(X, labels, top_k=80, candidates=40)
        assert ranking.candidates == 40 and len({r.source for r in ranking}) == 40
        for result in ranking:
            assert result.score == pytest.approx(full[result.source], rel=1e-9)
        assert bool(calls) == calibrated
        if calibrated:
            sampled = {f"s{i}" for i in index.prefilter().calibration_sample(16)}
            assert sampled <= {r.source for r in ranking}


@pytest.mark.parametrize("n", [10, 120])  # calibrated first pass, plain one
def test_sources_removed_since_the_prefilter_was_built_drop_out(tmp_path, n):
    W, b = structured_maps(80)
    X, labels = target(n=n)
    with index_of(tmp_path / "index", W, b, calibration=16, screen=6.5, anchors=20, local_rank=2) as index:
        stale = index.prefilter()
        gone = {f"s{i}" for i in stale.calibration_sample(16)[:4]} | {"s0", "s1", "s2"}
        for name in gone:
            index.remove(name)
        ranking = rank(index.store, stale, X, labels, top_k=80, candidates=40)
        assert ranking.candidates == 40 and not gone & {r.source for r in ranking}


def test_prefilter_settings_are_checked():
    for bad in ({"rank": 0}, {"train_max": 0}, {"exact_max": -5}, {"nprobe": 0}, {"rank": 1.5}, {"seed": True},
                {"calibration": -1}, {"calibration": 2.0}):
        with pytest.raises(ESMIndexError, match="prefilter"):
            PrefilterConfig(**bad)
    legacy = {"rank": 24, "sketch_rank": 64, "seed": 0, "shortlist": 0, "exact_max": 50_000, "nprobe": 64}
    assert PrefilterConfig.from_meta(legacy) == PrefilterConfig(rank=24)  # an earlier index's settings


def test_pool_mixes_real_maps_and_projects_them_in_batches():
    pool_module = load_tool("pool")
    W, b = structured_maps(6)
    pool = pool_module.DerivedPool.derive([f"r{k}" for k in range(6)], W, b, 50, seed=3)
    assert len(pool) == 50 and pool.name(2) == "r2" and pool.name(20) == "mix20"
    assert pool.recipe(2) == {"r2": 1.0} and sum(pool.recipe(20).values()) == pytest.approx(1, abs=1e-3)
    np.testing.assert_allclose(pool.mix.sum(1), 1, rtol=1e-6)
    Wm, bm = pool.materialise(np.arange(6))
    np.testing.assert_array_equal(Wm, W)  # the real maps come first, unchanged
    direct = log_moments(*pool.materialise(np.arange(50)))
    basis = Basis.fit(direct[::2], rank=8)
    np.testing.assert_allclose(pool.coordinates(basis, batch=16, threads=2), basis.coordinates(direct), atol=1e-5)
