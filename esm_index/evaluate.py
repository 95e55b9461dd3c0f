"""How good is a ranking of sources? Regret@k, NDCG, recall@k and rank correlations: pure functions.

Every function takes, for one target, the true performance of each source after transfer (accuracy in
[0, 1], one value per source) and a method's scores for the same sources (higher = predicted better).
A NaN score means "not ranked" (e.g. left out by the prefilter): such sources come last. Ties and NaNs
keep input order, so keep that order uninformative (e.g. sorted by name) and compare with random.
"""

from math import comb

import numpy as np

from .errors import ESMIndexError


def _true(true):
    true = np.asarray(true, dtype=np.float64)
    if true.ndim != 1 or len(true) == 0:
        raise ESMIndexError(f"true performances must be a non-empty 1-d array, got shape {true.shape}")
    if not np.isfinite(true).all() or true.min() < 0 or true.max() > 1:
        raise ESMIndexError("true performances must be finite and within [0, 1] (accuracy, not percent)")
    return true


def _pair(true, scores):
    true = _true(true)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != true.shape:
        raise ESMIndexError(f"{len(scores)} scores for {len(true)} sources")
    return true, scores


def _k(k, n):
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ESMIndexError(f"k must be a positive integer, got {k!r}")
    return min(int(k), n)


def ranking(scores):
    """Source indices, best score first; NaN scores last; ties and NaNs in input order."""
    scores = np.asarray(scores, dtype=np.float64)
    return np.argsort(-np.where(np.isnan(scores), -np.inf, scores), kind="stable")


def best_performance(true, baseline=None):
    """The best result available for the target: the best source, or training without one if better."""
    true = _true(true)
    return float(true.max() if baseline is None else max(true.max(), float(baseline)))


def regret_at_k(true, scores, k, baseline=None):
    """(best - best true performance among the top k by score) / best x 100, in percent of best.

    `baseline` is the performance with no intermediate task; it counts towards `best` (as in the
    paper), so a ranking can have positive regret even when it is perfect, if no source helps.
    """
    true, scores = _pair(true, scores)
    best = best_performance(true, baseline)
    picked = true[ranking(scores)[: _k(k, len(true))]].max()
    return (best - picked) / best * 100


def expected_random_regret(true, k, baseline=None):
    """Exact expected regret@k of a uniformly random ranking: the chance that the best of k random
    sources is the j-th best overall is C(n - j, k - 1) / C(n, k)."""
    true = _true(true)
    n, k = len(true), _k(k, len(true))
    best = best_performance(true, baseline)
    ordered = np.sort(true)[::-1]
    chance = np.array([comb(n - j, k - 1) for j in range(1, n + 1)], dtype=np.float64) / comb(n, k)
    return float(((best - ordered) / best * 100) @ chance)


def ndcg(true, scores, k=None):
    """NDCG of the ranking by score, with gain 2^(100 x performance) - 1 (DESIGN, after the paper).

    The gain doubles per accuracy point, so NDCG mostly asks whether the best sources come first.
    Gains are divided by 2^(100 x max performance) first, which leaves the ratio unchanged.
    """
    true, scores = _pair(true, scores)
    k = len(true) if k is None else _k(k, len(true))
    gain = np.exp2(100 * (true - true.max())) - np.exp2(-100 * true.max())
    discount = 1 / np.log2(np.arange(2, k + 2))
    ideal = np.sort(gain)[::-1][:k] @ discount
    if ideal <= 0:  # every source scored 0: any order is ideal
        return 1.0
    return float(gain[ranking(scores)[:k]] @ discount / ideal)


def recall_at_k(reference, candidates, k):
    """Share of the top k sources by `reference` scores that are among `candidates` (source indices):
    how much of the exact full scan's top k survives a prefilter."""
    reference = np.asarray(reference, dtype=np.float64)
    if reference.ndim != 1 or len(reference) == 0:
        raise ESMIndexError(f"reference scores must be a non-empty 1-d array, got shape {reference.shape}")
    k = _k(k, len(reference))
    top = set(ranking(reference)[:k].tolist())
    return len(top & {int(c) for c in candidates}) / k


def rank_correlation(a, b):
    """Spearman's rho and Kendall's tau-b between two score vectors, over the entries finite in both."""
    from scipy.stats import kendalltau, spearmanr

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ESMIndexError(f"rank correlation needs two 1-d arrays of one length, got {a.shape} and {b.shape}")
    both = np.isfinite(a) & np.isfinite(b)
    if both.sum() < 3:
        raise ESMIndexError(f"rank correlation needs at least 3 sources scored by both, got {both.sum()}")
    return {
        "spearman": float(spearmanr(a[both], b[both]).statistic),
        "kendall": float(kendalltau(a[both], b[both]).statistic),
    }
