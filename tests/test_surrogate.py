"""The second stage: which screened candidates get the exact rescoring budget."""

import numpy as np
import pytest
from test_prefilter import index_of, structured_maps, target

from esm_index import ESMIndexError, surrogate
from esm_index.evaluate import recall_at_k
from esm_index.prefilter import PrefilterConfig
from esm_index.surrogate import (FIRST_PASS_ANCHORS, farthest_points, least_anchors, principal_coordinates, scaled,
                                 select)


def curved_region(count=600, seed=0):
    """Candidates whose exact score peaks inside their region (along its two widest directions), ordered
    by a first pass that sees only the slope: what the linearised evidence gives near the best sources."""
    rng = np.random.default_rng(seed)
    coordinates = rng.standard_normal((count, 12)) * np.r_[3.0, 2.5, np.full(10, 0.3)]
    exact = -((coordinates[:, 0] - 2.0) ** 2) - (coordinates[:, 1] + 1.5) ** 2 + 0.1 * coordinates[:, 2]
    first_pass = 4.0 * coordinates[:, 0] - 3.0 * coordinates[:, 1] + rng.normal(0, 1.0, count)
    order = np.argsort(-first_pass)
    return first_pass[order], coordinates[order], exact[order]


class Rescorer:
    """rescore() over a known score vector, counting what it is asked."""

    def __init__(self, scores):
        self.scores, self.asked = scores, []

    def __call__(self, picks):
        self.asked.extend(np.asarray(picks).tolist())
        return self.scores[picks]


def test_the_surrogate_finds_a_curved_optimum_the_first_pass_misses():
    found = []
    for seed in range(6):
        first_pass, coordinates, exact = curved_region(seed=seed)
        rescore = Rescorer(exact)
        chosen, scores = select(first_pass, coordinates, 100, rescore)
        assert recall_at_k(exact, np.arange(100), 5) <= 0.4  # the first pass's own top 100
        found.append(recall_at_k(exact, chosen, 5))
        assert len(chosen) == 100 and len(set(chosen.tolist())) == 100
        np.testing.assert_array_equal(scores, exact[chosen])  # every score returned is exact
        assert rescore.asked == chosen.tolist()  # nothing else was rescored, in the order returned
    assert min(found) >= 0.8 and np.mean(found) >= 0.9, found


def test_rescoring_comes_in_anchors_then_batches():
    first_pass, coordinates, exact = curved_region()
    calls = []
    select(first_pass, coordinates, 100, lambda picks: calls.append(len(picks)) or exact[picks], batch=8)
    assert calls == [24] + [8] * 9 + [4]
    chosen, _ = select(first_pass, coordinates, 100, Rescorer(exact))
    np.testing.assert_array_equal(chosen[:FIRST_PASS_ANCHORS], np.arange(FIRST_PASS_ANCHORS))  # the first pass's best


def test_models_stop_evaluating_candidates_far_below_their_best(monkeypatch):
    first_pass, coordinates, exact = curved_region(3000)
    assert len(first_pass) > surrogate.ACTIVE
    pruned, _ = select(first_pass, coordinates, 100, Rescorer(exact))
    monkeypatch.setattr(surrogate, "ACTIVE", 10**9)  # every candidate evaluated every round
    full, _ = select(first_pass, coordinates, 100, Rescorer(exact))
    assert recall_at_k(exact, pruned, 5) == recall_at_k(exact, full, 5) and len(set(pruned) & set(full)) >= 90


def test_all_candidates_are_rescored_when_they_fit_the_budget():
    first_pass, coordinates, exact = curved_region(50)
    chosen, scores = select(first_pass, coordinates, 50, Rescorer(exact))
    np.testing.assert_array_equal(chosen, np.arange(50))
    np.testing.assert_array_equal(scores, exact)


def test_a_budget_too_small_for_the_surrogate_keeps_the_first_pass_order():
    first_pass, coordinates, exact = curved_region()
    assert 20 // 2 < least_anchors(8)  # 10 anchors are too few for the default model
    chosen, _ = select(first_pass, coordinates, 20, Rescorer(exact))
    np.testing.assert_array_equal(chosen, np.arange(20))


def test_anchors_without_a_finite_score_are_left_out_of_the_fit():
    first_pass, coordinates, exact = curved_region()
    broken = exact.copy()
    anchors = farthest_points(scaled(principal_coordinates(coordinates, 8)), 24, first=FIRST_PASS_ANCHORS)
    broken[anchors[::3]] = np.nan  # a third of the anchors fail
    chosen, scores = select(first_pass, coordinates, 100, Rescorer(broken))
    assert len(set(chosen.tolist())) == 100 and np.isnan(scores).sum() == 8
    unbroken, _ = select(first_pass, coordinates, 100, Rescorer(exact))
    assert recall_at_k(exact, chosen, 5) == recall_at_k(exact, unbroken, 5) >= 0.8  # the other 16 still fit it


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_first_pass_scores_still_give_distinct_candidates(bad):
    first_pass, coordinates, exact = curved_region(300)
    first_pass[[3, 50, 299]] = bad
    chosen, scores = select(first_pass, coordinates, 100, Rescorer(exact))
    assert len(set(chosen.tolist())) == 100
    np.testing.assert_array_equal(scores, exact[chosen])


def test_anchors_spread_from_the_first_pass_best():
    points = np.array([[0.0, 0.0], [0.1, 0.0], [5.0, 0.0], [0.0, 4.0], [2.0, 2.0]])
    np.testing.assert_array_equal(farthest_points(points, 3), [0, 2, 3])
    assert np.allclose(scaled(principal_coordinates(points, 2)).std(0), 1.0)
    common = scaled(principal_coordinates(points, 2), standardised=False)
    assert np.isclose(common.var(0).mean(), 1.0) and common.std(0)[0] > common.std(0)[1]  # minor stays minor
    for standardised in (True, False):  # no spread: zeros, not NaN
        assert np.allclose(scaled(principal_coordinates(np.ones((5, 3)), 2), standardised), 0.0)
    np.testing.assert_array_equal(farthest_points(np.zeros((6, 2)), 4), [0, 1, 2, 3])  # never twice
    np.testing.assert_array_equal(farthest_points(points, 3, first=2), [0, 1, 2])  # the given ones, then spread
    np.testing.assert_array_equal(farthest_points(points, 2, first=3), [0, 1])


def test_identical_candidates_are_each_rescored_once():
    first_pass = np.linspace(1.0, 0.0, 100)
    chosen, scores = select(first_pass, np.ones((100, 8)), 40, Rescorer(np.arange(100.0)))
    assert len(set(chosen.tolist())) == 40
    np.testing.assert_array_equal(scores, chosen)


def test_queries_spend_the_budget_through_the_surrogate(tmp_path):
    W, b = structured_maps(80)
    X, labels = target()
    with index_of(tmp_path / "index", W, b, screen=6.5, anchors=20, local_rank=2) as index:
        full = {r.source: r.score for r in index.query_embeddings(X, labels, top_k=80, candidates=None)}
        ranking = index.query_embeddings(X, labels, top_k=5, candidates=40)
        assert ranking.candidates == 40 and ranking.pool == 80
        assert [r.source for r in ranking] == sorted(full, key=full.get, reverse=True)[:5]
        for result in ranking:
            assert result.score == pytest.approx(full[result.source], rel=1e-9)
        assert index.meta["prefilter"]["screen"] == 6.5 and index.info()["prefilter"]["anchors"] == 20
        for bad in (0, -5):
            with pytest.raises(ESMIndexError, match="candidates must be positive"):
                index.query_embeddings(X, labels, candidates=bad)
        with pytest.raises(ESMIndexError, match="does not hold"):
            index.prefilter().coordinates_of(np.array([10_000]))


@pytest.mark.parametrize("setting, value", [("screen", 0), ("screen", -1.0), ("screen", "30"), ("screen", True),
                                            ("screen", float("inf")), ("anchors", 0), ("anchors", 10),
                                            ("local_rank", 0), ("local_rank", 2.5)])
def test_second_stage_settings_are_checked(setting, value):
    with pytest.raises(Exception, match=setting):
        PrefilterConfig(**{setting: value})


def test_the_screen_grows_as_the_root_of_the_pool_and_covers_the_budget():
    config = PrefilterConfig(screen=30.0)
    assert config.screened(10_000, 100) == 3000
    assert config.screened(100_000, 100) == 9487
    assert config.screened(100, 500) == 500


def test_indexes_made_before_the_second_stage_get_its_defaults():
    config = PrefilterConfig.from_meta({"rank": 64, "train_max": 2048, "seed": 0, "exact_max": 50000, "nprobe": 64})
    assert (config.screen, config.anchors, config.local_rank, config.batch) == (30.0, 24, 8, 8)
