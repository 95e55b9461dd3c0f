"""The second stage: which of the prefilter's screened candidates get the exact rescoring budget.

Why. The first pass ranks by the evidence linearised at the pool's mean log map. That finds the region of
the best sources, but near them the exact evidence is curved (at its maximum the slope vanishes), so the
first pass orders the sources inside that region poorly: on a pool derived from real ESMs it ranks the
exact top 5 at 200-1,500 of 10,000. Its gradient at the region's centre is no help either (it ranks the
region worse still), while a quadratic in a few local coordinates, fitted to exact scores, orders it well.

How. FAISS screens `screen` sqrt(N) candidates. Their prefilter coordinates, centred, are reduced to their
`local_rank` principal directions (standardised): the region's own shape. `anchors` candidates spread over
it (farthest-point sampling from the first pass's best) are rescored exactly, a quadratic in the local
coordinates plus the first-pass score is fitted to them by ridge regression, and the rest of the budget
goes to the candidates it rates best. Every score returned is exact; the surrogate only chooses which to
compute, at the cost of one small SVD and a least-squares fit.
"""

import numpy as np

RIDGE = 0.1  # on standardised features: keeps the fit stable when anchors nearly line up


def select(first_pass, coordinates, budget, rescore, anchors=48, local_rank=4):
    """Indices into the screened candidates (first_pass: their first-pass scores, best first; coordinates:
    their prefilter vectors) chosen for exact rescoring, and their exact scores: all of them if they fit the
    budget, else `anchors` spread ones and the surrogate's best of the rest, `budget` in all. When half the
    budget is fewer anchors than the surrogate has coefficients (`coefficients(local_rank)`, 16 at 4), the
    first pass's order decides. rescore(indices) returns exact scores (NaN where not finite)."""
    count = len(first_pass)
    if count <= budget:
        chosen = np.arange(count)
        return chosen, rescore(chosen)
    spread_count = min(anchors, budget // 2)
    if spread_count < coefficients(local_rank):
        chosen = np.arange(budget)
        return chosen, rescore(chosen)
    local = local_coordinates(coordinates, local_rank)
    features = quadratic_features(first_pass, local)
    chosen = farthest_points(local, spread_count)
    scores = rescore(chosen)
    finite = np.isfinite(scores)
    predicted = -np.arange(count, dtype=np.float64)  # too few finite anchors: the first pass's order decides
    if finite.sum() >= features.shape[1]:
        predicted = features @ ridge(features[chosen[finite]], scores[finite])
    others = np.setdiff1d(np.arange(count), chosen)
    ranked = others[np.argsort(-np.nan_to_num(predicted[others], nan=-np.inf), kind="stable")]
    rest = ranked[: budget - spread_count]
    return np.concatenate([chosen, rest]), np.concatenate([scores, rescore(rest)])


def coefficients(local_rank):
    """The surrogate's coefficients: intercept, first-pass score, local_rank coordinates, their products."""
    return 2 + local_rank + local_rank * (local_rank + 1) // 2


def local_coordinates(coordinates, rank):
    """The candidates' coordinates on their own `rank` leading principal directions, each scaled to unit
    standard deviation (directions without spread stay zero)."""
    centred = np.asarray(coordinates, np.float64) - np.mean(coordinates, axis=0)
    _, _, directions = np.linalg.svd(centred, full_matrices=False)
    local = centred @ directions[:rank].T
    spread = local.std(0)
    return local / np.where(spread > 0, spread, 1.0)


def quadratic_features(first_pass, local):
    """1, the standardised first-pass score, the local coordinates and their products (i <= j). Non-finite
    first-pass scores (from a degenerate target) are clipped to the finite ones' range."""
    first = np.asarray(first_pass, np.float64)
    finite = first[np.isfinite(first)]
    low, high = (finite.min(), finite.max()) if len(finite) else (0.0, 0.0)
    first = np.nan_to_num(first, nan=low, posinf=high, neginf=low)
    first = (first - first.mean()) / max(first.std(), 1e-300)
    rows, cols = np.triu_indices(local.shape[1])
    return np.column_stack([np.ones(len(first)), first, local, local[:, rows] * local[:, cols]])


def farthest_points(points, count):
    """`count` distinct row indices of points, each the farthest from those before it, starting from row 0
    (ties, coincident points included, go to the lowest row)."""
    chosen = [0]
    distance = np.linalg.norm(points - points[0], axis=1)
    while len(chosen) < count:
        distance[chosen[-1]] = -np.inf
        chosen.append(int(np.argmax(distance)))
        distance = np.minimum(distance, np.linalg.norm(points - points[chosen[-1]], axis=1))
    return np.array(chosen)


def ridge(features, targets):
    """Coefficients of a ridge regression (RIDGE on every coefficient, the targets centred)."""
    return np.linalg.solve(features.T @ features + RIDGE * np.eye(features.shape[1]),
                           features.T @ (targets - targets.mean()))
