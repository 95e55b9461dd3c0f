"""LogME: the fast paths against thuml's code path as published (tools/bench_logme.py's reference)."""

import numpy as np
import pytest
from conftest import load_tool

from esm_index.errors import ESMIndexError
from esm_index.logme import TargetStats, _eigen_evidence, encode_labels, logme_from_stats, logme_score

RTOL = 1e-8
reference_logme = load_tool("bench_logme").reference_logme


def random_esms(rng, K, d, noise=0.3):
    W = np.eye(d) + noise * rng.standard_normal((K, d, d)) / np.sqrt(d)
    return W, 0.1 * rng.standard_normal((K, d))


def check_all_paths(X, labels, W, b, regression=False):
    """Reference on materialised F == logme_score == logme_from_stats, ESM by ESM."""
    Y = encode_labels(labels, regression)
    stats = TargetStats.from_embeddings(X, labels, regression)
    fast = logme_from_stats(W, b, stats, batch_size=2)
    for k in range(len(W)):
        F = X @ W[k].T + b[k]
        ref = reference_logme(F, Y)
        assert np.isfinite(ref)
        np.testing.assert_allclose(logme_score(F, labels, regression), ref, rtol=RTOL)
        np.testing.assert_allclose(fast[k], ref, rtol=RTOL)


def clustered(rng, n, d, C):
    """Features with real class structure, so LogME has signal to find."""
    y = rng.integers(0, C, n)
    X = rng.standard_normal((C, d))[y] + rng.standard_normal((n, d))
    return X, y


def test_classification_string_labels():
    rng = np.random.default_rng(0)
    X, y = clustered(rng, 300, 24, 4)
    labels = np.array(["cat", "dog", "emu", "yak"])[y]
    check_all_paths(X, labels, *random_esms(rng, 5, 24))


def test_regression_single_and_multi_output():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((200, 16))
    y = X @ rng.standard_normal(16) + 0.5 * rng.standard_normal(200)
    check_all_paths(X, y, *random_esms(rng, 3, 16), regression=True)
    Y = np.column_stack([y, np.sin(X[:, 0]), X[:, 1] ** 2])
    check_all_paths(X, Y, *random_esms(rng, 3, 16), regression=True)


def test_entries_stop_at_their_own_iteration():
    # reference iteration counts per (ESM scale, column): 0.01 -> 9, 11 (cap); 1 -> 3, 11; 100 -> 2, 4
    rng = np.random.default_rng(8)
    X = rng.standard_normal((40, 10))
    Y = np.column_stack([X @ rng.standard_normal(10) + 0.1 * rng.standard_normal(40), rng.standard_normal(40)])
    W = np.array([s * np.eye(10) for s in (0.01, 1.0, 100.0)])
    check_all_paths(X, Y, W, np.zeros((3, 10)), regression=True)


def test_labels_need_not_be_contiguous_integers():
    rng = np.random.default_rng(2)
    X, y = clustered(rng, 120, 8, 3)
    F = X
    assert logme_score(F, np.array([7, 42, -3])[y]) == pytest.approx(logme_score(F, y), rel=1e-12)


@pytest.mark.parametrize("case", ["n_below_d", "duplicate_features", "constant_features",
                                  "single_example_class", "rank_deficient_map", "dead_output_features",
                                  "dead_output_features_n_below_d", "huge_rank_deficient_map"])
def test_degenerate_inputs_agree(case):
    rng = np.random.default_rng(3)
    d = 20
    X, y = clustered(rng, 150, d, 3)
    W, b = random_esms(rng, 4, d)
    if case == "n_below_d":
        X, y = X[:12], y[:12]
    elif case == "duplicate_features":
        X[:, 10:] = X[:, :10]
    elif case == "constant_features":
        X[:, 5:9] = 2.5
    elif case == "single_example_class":
        y[0] = 3
    elif case.startswith("dead_output_features"):  # all-zero outputs: rounding-level eigenvalues, counted
        W[:, 4:7], b[:, 4:7] = 0.0, 0.0
        if case.endswith("n_below_d"):
            X, y = X[:12], y[:12]
    elif case == "rank_deficient_map":
        W[:, :, 6:] = 0.0          # F depends on only 6 input dimensions
        W[:, 3] = W[:, 2]          # and two output features coincide
    elif case == "huge_rank_deficient_map":  # rounding of G beyond the fixed point's t: G's eigenvectors
        W, b = 1e7 * W, 1e7 * b
        W[:, :3] = W[:, 3:6]
    check_all_paths(X, y, W, b)


def test_score_is_continuous_as_a_singular_value_of_the_map_vanishes():
    """A map's smallest singular value swept from 1e-4 to 1e-9 crosses the rank cut-off: the eigenvalue turns
    into a counted zero, as thuml keeps it, so the score barely moves (dropping it would jump by log(alpha)/2n)."""
    rng = np.random.default_rng(7)
    d = 20
    X, y = clustered(rng, 150, d, 3)
    U, _, Vt = np.linalg.svd(rng.standard_normal((d, d + 1)), full_matrices=False)
    scores = []
    for smallest in np.geomspace(1e-4, 1e-9, 11):
        Wt = (U * np.r_[np.ones(d - 1), smallest]) @ Vt
        check_all_paths(X, y, Wt[None, :, :-1], Wt[None, :, -1])
        scores.append(logme_from_stats(Wt[None, :, :-1], Wt[None, :, -1], TargetStats.from_embeddings(X, y))[0])
    assert np.ptp(scores) < 1e-6


def test_a_cut_eigenvalue_counts_the_same_however_small():
    """Below the rank cut-off an eigenvalue of G is rounding, and its size is the decomposition's accident:
    thuml computes such values near eps * |G| and keeps them, the paths here can return them far smaller
    (down to 1e-21 for real 384-d maps fitted on 250 examples). Each must add log(alpha) all the same; a
    cut at 1e-20 on them moved such scores by ~0.005 away from thuml's."""
    rng = np.random.default_rng(5)
    n, d = 60, 6
    s2 = np.r_[np.geomspace(1.0, 50.0, d - 1), 0.0]
    z = rng.standard_normal((d, 2))
    z[-1] = 0.0
    scores = []
    for rounding in (1e-13, 1e-19, 1e-21, 0.0, -1e-21):
        s2[-1] = rounding
        scores.append(_eigen_evidence(s2, z, np.full(2, 30.0), n, d))
    assert np.ptp(scores) < 1e-12


@pytest.mark.parametrize("n", [5, 18, 19, 20, 21, 22])
def test_sample_sizes_around_d_agree(n):
    """Fewer examples than dimensions decompose the rank x rank side, more the d x d Gram: both exact."""
    rng = np.random.default_rng(n)
    X, y = clustered(rng, n, 20, 3)
    W, b = random_esms(rng, 3, 20)
    check_all_paths(X, y, W, b)


def test_identity_map_equals_plain_logme_of_embeddings():
    rng = np.random.default_rng(4)
    X, y = clustered(rng, 100, 12, 2)
    stats = TargetStats.from_embeddings(X, y)
    score = logme_from_stats([np.eye(12, dtype=np.float32)], np.zeros((1, 12)), stats)
    np.testing.assert_allclose(score, [logme_score(X, y)], rtol=RTOL)


def test_batching_and_dtypes_do_not_change_scores():
    rng = np.random.default_rng(5)
    X, y = clustered(rng, 80, 10, 3)
    W, b = random_esms(rng, 7, 10)
    W = W.astype(np.float32)
    stats = TargetStats.from_embeddings(X, y)
    whole = logme_from_stats(W, b, stats, batch_size=64)
    np.testing.assert_array_equal(logme_from_stats(list(W), b, stats, batch_size=3), whole)
    assert logme_from_stats(W[:0], b[:0], stats).shape == (0,)


def test_non_finite_or_empty_maps_give_nan():
    rng = np.random.default_rng(6)
    X, y = clustered(rng, 60, 6, 2)
    W, b = random_esms(rng, 3, 6)
    W[0, 1, 1] = np.nan
    W[1], b[1] = 0.0, 0.0
    scores = logme_from_stats(W, b, TargetStats.from_embeddings(X, y))
    assert np.isnan(scores[:2]).all() and np.isfinite(scores[2])
    assert np.isnan(logme_score(np.zeros((10, 3)), [0, 1] * 5))
    empty = TargetStats(A=np.zeros((7, 7)), B=np.zeros((7, 2)), yy=np.ones(2), n=4)  # hand-built, rank 0
    assert np.isnan(logme_from_stats(W[2:], b[2:], empty)).all()


def test_encode_labels():
    Y = encode_labels(["b", "a", "b", "c"], regression=False)
    np.testing.assert_array_equal(Y, [[0, 1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    assert encode_labels([1.5, 2.0], regression=True).shape == (2, 1)
    assert encode_labels(np.ones((3, 2)), regression=True).dtype == np.float64


@pytest.mark.parametrize("labels, regression", [
    (["a", "a", "a"], False),
    ([1.0, np.nan], False),
    ([[0, 1], [1, 0]], False),
    ([0.5, np.inf], True),
    (["x", "y"], True),
    (np.ones((2, 2, 2)), True),
])
def test_bad_labels(labels, regression):
    with pytest.raises(ESMIndexError):
        encode_labels(labels, regression)


def test_bad_inputs():
    X = np.random.default_rng(7).standard_normal((10, 4))
    y = [0, 1] * 5
    with pytest.raises(ESMIndexError):
        logme_score(X, y[:-1])
    with pytest.raises(ESMIndexError):
        logme_score(np.where(X > 1, np.nan, X), y)
    with pytest.raises(ESMIndexError):
        TargetStats.from_embeddings(X[:, 0], y)
    with pytest.raises(ESMIndexError):
        TargetStats.from_embeddings(np.empty((0, 4)), [])
    stats = TargetStats.from_embeddings(X, y)
    with pytest.raises(ESMIndexError):
        logme_from_stats(np.ones((2, 4, 4)), np.ones((3, 4)), stats)
    with pytest.raises(ESMIndexError):
        logme_from_stats(np.ones((2, 5, 5)), np.ones((2, 5)), stats)
    with pytest.raises(ESMIndexError):
        logme_from_stats(np.ones((2, 4, 4)), np.ones((2, 4)), stats, batch_size=0)


def test_concurrent_scans_agree_and_restore_blas_threads():
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_info

    before = [lib["num_threads"] for lib in threadpool_info()]
    rng = np.random.default_rng(9)
    X, y = clustered(rng, 60, 8, 2)
    W, b = random_esms(rng, 6, 8)
    stats = TargetStats.from_embeddings(X, y)
    with ThreadPoolExecutor(3) as pool:
        runs = list(pool.map(lambda _: logme_from_stats(W, b, stats, batch_size=2), range(3)))
    for run in runs:
        np.testing.assert_array_equal(run, runs[0])
    assert [lib["num_threads"] for lib in threadpool_info()] == before


def test_inconsistent_stats_rejected():
    with pytest.raises(ESMIndexError):
        TargetStats(A=np.eye(3), B=np.ones((4, 2)), yy=np.ones(2), n=5)
    with pytest.raises(ESMIndexError):
        TargetStats(A=np.eye(3), B=np.ones((3, 2)), yy=np.ones(2), n=0)
