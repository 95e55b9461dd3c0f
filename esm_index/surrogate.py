"""The second stage: which of the prefilter's screened candidates get the exact rescoring budget.

Why. The first pass ranks by the evidence linearised at the pool's mean log map. That finds the region of
the best sources, but near them the exact evidence is curved (at its maximum the slope vanishes), so the
first pass orders the sources inside that region poorly: on a pool derived from real ESMs it ranks the
exact top 5 at 200-1,500 of 10,000. A model of the exact score over the region, fitted to exact scores as
they come in, orders it well.

How (a small batch Bayesian-optimisation loop). FAISS screens `screen` sqrt(N) candidates. Their prefilter
coordinates, centred, are reduced to their `local_rank` principal directions: the region's own shape.
`anchors` candidates are rescored exactly first: the first pass's best few (near its top the first pass is
still informative) and the rest spread over the region (farthest-point sampling). Then, until the budget
is spent, `batch` more at a time, half chosen by each of two Gaussian-process models of the exact score
fitted to the scores so far (squared-exponential kernel; length scale and noise chosen by marginal
likelihood), which see the region in two ways (VIEWS):
  edge      each local direction standardised, a linear trend in the first-pass score and in the local
            coordinates, and candidates chosen by an upper confidence bound (posterior mean + 2 standard
            deviations): finds optima at the region's rim, where the derived pools put theirs;
  interior  the local coordinates at their common scale (minor directions stay minor), a trend in the
            first-pass score only, candidates chosen by posterior mean: finds an optimum inside the
            region, where the edge model's trend would extrapolate past it.
Either alone misses what the other finds (BENCHMARKS.md, "Second stage"). After each round a model keeps
evaluating only its ACTIVE best candidates by the bound (those far below cannot overtake them in the few
rounds left; the same recall on every benchmark pool, a third of the cost at 10^5). Every score returned
is exact; the models only choose which to compute.
"""

from dataclasses import dataclass

import numpy as np
from scipy.linalg import cho_solve, solve_triangular

from .logme import single_threaded_blas

LENGTH_SCALES = (0.25, 0.5, 1.0, 2.0)  # of the kernel, per unit of local distance / sqrt(local_rank)
NOISES = (1e-3, 1e-2, 1e-1)  # kernel diagonal: the share of the residual's variance the kernel leaves out
FIRST_PASS_ANCHORS = 8  # of the anchors, the first pass's best (at most a third of them)
ACTIVE = 1024  # candidates a model keeps evaluating after each round: its best by the bound


@dataclass(frozen=True)
class View:
    """How one of the second stage's models sees the screened region."""

    standardised: bool  # each local direction scaled to unit spread (else all by one common scale)
    local_trend: bool  # the linear trend includes the local coordinates (else the first-pass score only)
    exploration: float  # posterior standard deviations added to the mean when choosing candidates


VIEWS = (View(standardised=True, local_trend=True, exploration=2.0),  # edge
         View(standardised=False, local_trend=False, exploration=0.0))  # interior


def select(first_pass, coordinates, budget, rescore, anchors=24, local_rank=8, batch=8):
    """Indices into the screened candidates (first_pass: their first-pass scores, best first; coordinates:
    their prefilter vectors) chosen for exact rescoring, in the order rescored, and their exact scores: all
    of them if they fit the budget, else `anchors` (the first pass's best few, then spread ones) and then
    `batch` at a time by the models, `budget` in all. When half the budget is fewer anchors than
    `least_anchors(local_rank)`, the first pass's order decides. rescore(indices) returns exact scores (NaN
    where not finite)."""
    count = len(first_pass)
    if count <= budget:
        chosen = np.arange(count)
        return chosen, rescore(chosen)
    spread_count = min(anchors, budget // 2)
    if spread_count < least_anchors(local_rank):
        chosen = np.arange(budget)
        return chosen, rescore(chosen)
    with single_threaded_blas():  # small products: threads gain nothing, and their spinning slows rescore
        principal = principal_coordinates(coordinates, local_rank)
        models = [Model(first_pass, scaled(principal, view.standardised), view, budget) for view in VIEWS]
        chosen = farthest_points(models[0].local, spread_count, first=min(FIRST_PASS_ANCHORS, spread_count // 3))
    scores = rescore(chosen)
    while len(chosen) < budget:
        picks = []
        with single_threaded_blas():
            for model, share in zip(models, np.array_split(np.arange(min(batch, budget - len(chosen))), len(models))):
                bound = model.upper_bound(chosen, scores)
                bound[np.concatenate([chosen, picks]).astype(int)] = -np.inf
                picks += np.argsort(-bound, kind="stable")[: len(share)].tolist()
        picks = np.array(picks, dtype=int)
        chosen, scores = np.concatenate([chosen, picks]), np.concatenate([scores, rescore(picks)])
    return chosen, scores


def least_anchors(local_rank):
    """Anchors the models need: one more than the largest trend's coefficients (1, first pass, local
    coordinates)."""
    return local_rank + 3


def principal_coordinates(coordinates, rank):
    """The candidates' coordinates on their own `rank` leading principal directions (centred)."""
    centred = np.asarray(coordinates, np.float64) - np.mean(coordinates, axis=0)
    _, directions = np.linalg.eigh(centred.T @ centred)  # ascending
    return centred @ directions[:, ::-1][:, :rank]


def scaled(principal, standardised=True):
    """Principal coordinates each scaled to unit standard deviation (directions without spread stay zero),
    or with `standardised=False` all by the one factor that gives them unit mean variance."""
    spread = principal.std(0) if standardised else np.sqrt(np.mean(principal.var(0)))
    return principal / np.where(spread > 0, spread, 1.0)


def trend_features(first_pass, local=None):
    """1, the standardised first-pass score and (if given) the local coordinates. Non-finite first-pass
    scores (from a degenerate target) are clipped to the finite ones' range."""
    first = np.asarray(first_pass, np.float64)
    finite = first[np.isfinite(first)]
    low, high = (finite.min(), finite.max()) if len(finite) else (0.0, 0.0)
    first = np.nan_to_num(first, nan=low, posinf=high, neginf=low)
    first = (first - first.mean()) / max(first.std(), 1e-300)
    return np.column_stack([np.ones(len(first)), first] + ([] if local is None else [local]))


class Model:
    """A Gaussian process of the exact score over the screened candidates, as one view sees them; keeps the
    squared distances to the candidates rescored so far, so each round computes only the new ones."""

    def __init__(self, first_pass, local, view, budget):
        self.local, self.exploration = local, view.exploration
        self.trend = trend_features(first_pass, local if view.local_trend else None)
        # column j: squared distances to the j-th candidate rescored, over local_rank. float32: the kernel only
        # ranks candidates, and at 10^4 of them its exponentials are this stage's main cost
        self.squared = np.empty((len(local), budget), np.float32)
        self.filled = 0
        self.active = np.arange(len(local))  # the candidates it still evaluates

    def upper_bound(self, chosen, scores):
        """Posterior mean + `exploration` standard deviations of every candidate's exact score (-inf for
        those no longer evaluated), from the finite ones among the chosen; with too few of those for the
        trend, the first pass's order (a decreasing ramp)."""
        new = self.local[chosen[self.filled :]]
        self.squared[:, self.filled : len(chosen)] = squared_distances(self.local, new) / self.local.shape[1]
        self.filled = len(chosen)
        finite = np.isfinite(scores)
        known, values = chosen[finite], scores[finite]
        if len(known) <= self.trend.shape[1]:
            return -np.arange(len(self.local), dtype=np.float64)
        coef = np.linalg.lstsq(self.trend[known], values, rcond=None)[0]
        residual = values - self.trend[known] @ coef
        scale = max(residual.std(), 1e-300)
        squared = self.squared[:, : len(chosen)]
        squared = squared if finite.all() else squared[:, finite]
        weights, length, factor = fit_kernel(squared[known].astype(np.float64), residual / scale)
        active = self.active
        cross = np.exp(squared[active] * np.float32(-0.5 / length**2))
        kernel_part = cross @ weights.astype(np.float32)
        if self.exploration:
            explained = solve_triangular(factor.astype(np.float32), cross.T, lower=True)
            kernel_part += self.exploration * np.sqrt(np.maximum(1.0 - (explained**2).sum(0), 0.0))
        bound = np.full(len(self.local), -np.inf)
        bound[active] = self.trend[active] @ coef + scale * kernel_part
        self.active = active[np.argsort(-bound[active], kind="stable")[:ACTIVE]]
        return bound


def fit_kernel(squared, residual):
    """Kernel weights, length scale and Cholesky factor of the (LENGTH_SCALES x NOISES) setting with the
    highest marginal likelihood for the residual (unit variance) at points with these scaled squared
    distances."""
    best = (-np.inf, None, None, None)
    for length in LENGTH_SCALES:
        kernel = np.exp(-squared / (2 * length**2))
        for noise in NOISES:
            factor = np.linalg.cholesky(kernel + noise * np.eye(len(kernel)))
            weights = cho_solve((factor, True), residual)
            likelihood = -0.5 * residual @ weights - np.log(np.diag(factor)).sum()
            if likelihood > best[0]:
                best = (likelihood, weights, length, factor)
    return best[1:]


def squared_distances(points, centres):
    """(len(points), len(centres)) squared Euclidean distances, never negative."""
    return np.maximum((points**2).sum(1)[:, None] - 2 * points @ centres.T + (centres**2).sum(1)[None], 0.0)


def farthest_points(points, count, first=1):
    """`count` distinct row indices of points: rows 0 .. first - 1 (at least row 0), then each the farthest
    from those before it (ties, coincident points included, go to the lowest row)."""
    chosen = list(range(max(first, 1)))
    distance = np.min([np.linalg.norm(points - points[i], axis=1) for i in chosen], axis=0)
    distance[chosen] = -np.inf
    while len(chosen) < count:
        chosen.append(int(np.argmax(distance)))
        distance = np.minimum(distance, np.linalg.norm(points - points[chosen[-1]], axis=1))
        distance[chosen[-1]] = -np.inf
    return np.array(chosen[:count])
