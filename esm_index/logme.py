"""LogME, and exact ESM-LogME rescoring from a target's sufficient statistics.

LogME (You et al., thuml/LogME `_fit_fixed_point`) needs, per label column y, only the spectrum
s2 of G = F^T F and the squared projections x2 = (V^T F^T y)^2 / s2 of y on its eigenvectors, plus
y^T y and n. For mapped features F = X~ W~^T (X~ = [X, 1], W~ = [W, b]) these follow from
A = X~^T X~ and B = X~^T Y, computed once per target: G = W~ A W~^T and F^T Y = W~ B. So each ESM
costs O(d^3) whatever n is, and F is never built.

Rank cut-off (shared by every path here, so they agree on degenerate input): an eigenvalue s2 of G
is kept when its singular value sqrt(s2) > 1e-10 (thuml's rule) AND s2 > max(s2) * max(n, d) * eps.
The second rule is numpy's matrix_rank tolerance applied to G: eigenvalues of G that are truly zero
come out as ~eps * ||G||, whose square root is far above 1e-10, so the first rule alone would keep
noise directions and make the score depend on rounding. thuml itself applies no cut when n <= d;
here both regimes use the rule above.
"""

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from esm_index.errors import ESMIndexError

EPS = np.finfo(np.float64).eps
MAX_ITERATIONS = 11  # thuml's cap; it converges in 2-4 steps on real data
TOLERANCE = 1e-3     # on the relative change of t = alpha / beta
RIDGE = 1e-5         # thuml's epsilon in the alpha and beta updates


def encode_labels(labels, regression: bool) -> np.ndarray:
    """Labels as float64 columns, one per one-vs-rest class (any label values) or per regression target."""
    if regression:
        try:
            Y = np.asarray(labels, dtype=np.float64)
        except (TypeError, ValueError):
            raise ESMIndexError("regression labels must be numbers") from None
        if Y.ndim == 1:
            Y = Y[:, None]
        if Y.ndim != 2:
            raise ESMIndexError(f"regression labels must be 1-d or 2-d, got shape {Y.shape}")
        if not np.isfinite(Y).all():
            raise ESMIndexError("regression labels contain NaN or infinity")
        return Y
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ESMIndexError(f"class labels must be 1-d, got shape {labels.shape}")
    if labels.dtype.kind == "f" and not np.isfinite(labels).all():
        raise ESMIndexError("class labels contain NaN or infinity")
    try:
        classes, index = np.unique(labels, return_inverse=True)
    except TypeError:
        raise ESMIndexError("class labels must be all strings or all numbers") from None
    if len(classes) < 2:
        raise ESMIndexError(f"need at least 2 classes, got {len(classes)}")
    Y = np.zeros((len(labels), len(classes)))
    Y[np.arange(len(labels)), index] = 1.0
    return Y


def _features(X, name: str) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] == 0:
        raise ESMIndexError(f"{name} must be a non-empty 2-d array, got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ESMIndexError(f"{name} contain NaN or infinity")
    return X


def _targets(labels, n: int, regression: bool) -> np.ndarray:
    Y = encode_labels(labels, regression)
    if len(Y) != n:
        raise ESMIndexError(f"{n} feature rows but {len(Y)} labels")
    return Y


def _kept(s2: np.ndarray, n: int, d: int) -> np.ndarray:
    """Which eigenvalues of G = F^T F (last axis) are signal, not rounding: see the module docstring."""
    top = s2.max(axis=-1, keepdims=True)
    return (s2 > 1e-20) & (s2 > top * max(n, d) * EPS)


def _fixed_point(s2, z2, yy, n: int, d: int) -> np.ndarray:
    """thuml's fixed-point LogME for many spectra at once; returns the class-averaged evidence per spectrum.

    s2: (E, k) eigenvalues of G; z2: (E, C, k) squared projections (V^T F^T y_c)^2; yy: (E, C) y_c^T y_c.
    Every (spectrum, class) entry iterates until its own convergence, exactly like the per-class
    reference loop, so results match it to rounding.
    """
    keep = _kept(s2, n, d)[:, None, :]
    s2 = np.where(keep, s2[:, None, :], 0.0)                        # (E, 1, k)
    x2 = np.divide(z2, s2, out=np.zeros_like(z2), where=keep)       # (E, C, k)
    res_x2 = np.maximum(yy - x2.sum(-1), 0.0)                       # energy outside the kept span
    alpha, beta = np.ones_like(yy), np.ones_like(yy)
    m2, res2 = np.zeros_like(yy), np.zeros_like(yy)
    active = np.ones(yy.shape, dtype=bool)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for _ in range(MAX_ITERATIONS):
            t = alpha / beta
            tt = t[..., None]
            gamma = (s2 / (s2 + tt)).sum(-1)
            new_m2 = (s2 * x2 / (tt + s2) ** 2).sum(-1)
            new_res2 = (x2 / (1 + s2 / tt) ** 2).sum(-1) + res_x2
            new_alpha = gamma / (new_m2 + RIDGE)
            new_beta = (n - gamma) / (new_res2 + RIDGE)
            converged = np.abs(new_alpha / new_beta - t) / t <= TOLERANCE
            for old, new in ((alpha, new_alpha), (beta, new_beta), (m2, new_m2), (res2, new_res2)):
                np.copyto(old, new, where=active)
            active &= ~converged
            if not active.any():
                break
        logdet = np.log(alpha[..., None] + beta[..., None] * s2, where=keep, out=np.zeros_like(x2)).sum(-1)
        evidence = (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - logdet / 2
                    - beta / 2 * res2 - alpha / 2 * m2 - n / 2 * np.log(2 * np.pi)) / n
    score = evidence.mean(-1)
    return np.where(np.isfinite(score), score, np.nan)


def logme_score(features, labels, regression=False) -> float:
    """LogME of materialised features (thuml fixed-point semantics, float64, rank cut-off above)."""
    F = _features(features, "features")
    Y = _targets(labels, len(F), regression)
    n, d = F.shape
    if n > d:  # like thuml's truncated_svd: decompose the small d x d Gram matrix
        s2, V = np.linalg.eigh(F.T @ F)
        z = V.T @ (F.T @ Y)
    else:
        U, s, _ = np.linalg.svd(F, full_matrices=False)
        s2, z = s**2, s[:, None] * (U.T @ Y)  # V^T F^T Y, as in the Gram branch
    return float(_fixed_point(s2[None], (z.T**2)[None], (Y * Y).sum(0)[None], n, d)[0])


@dataclass(frozen=True)
class TargetStats:
    """Sufficient statistics of one target for ESM-LogME, with X~ = [X, 1]: O(d^2) whatever n is."""

    A: np.ndarray   # (d+1, d+1)  X~^T X~
    B: np.ndarray   # (d+1, C)    X~^T Y
    yy: np.ndarray  # (C,)        column sums of Y * Y
    n: int

    @classmethod
    def from_embeddings(cls, X, labels, regression=False) -> "TargetStats":
        X = _features(X, "target embeddings")
        Y = _targets(labels, len(X), regression)
        Xt = np.hstack([X, np.ones((len(X), 1))])
        return cls(A=Xt.T @ Xt, B=Xt.T @ Y, yy=(Y * Y).sum(0), n=len(X))

    @cached_property
    def root(self) -> np.ndarray:
        """R with R R^T = A (noise-level eigenvalues of A dropped): G = (W~R)(W~R)^T is then one
        product plus a symmetric rank-k update, cheaper than W~ A W~^T, and PSD by construction."""
        lam, Q = np.linalg.eigh(self.A)
        keep = lam > lam.max() * max(self.n, len(lam)) * EPS
        return Q[:, keep] * np.sqrt(lam[keep])


def logme_from_stats(weights, biases, stats: TargetStats, batch_size=64) -> np.ndarray:
    """ESM-LogME of K ESMs f(x) = W x + b for one target, from its statistics alone.

    weights: (K, d, d) array or sequence of (d, d) arrays, any float dtype; biases: (K, d).
    Returns float64 (K,), NaN where the score is not finite (e.g. a non-finite or all-zero map).
    Per ESM: G = W~ A W~^T, its eigen-decomposition and z = V^T W~ B; then the fixed-point loop runs
    vectorised over the batch's ESMs x classes. Memory is O(batch_size * d * C) plus O(d^2) per ESM.
    """
    d = stats.A.shape[0] - 1
    K = len(weights)
    biases = np.asarray(biases, dtype=np.float64)
    if biases.shape != (K, d):
        raise ESMIndexError(f"expected biases of shape ({K}, {d}) for {K} ESMs of dimension {d}, got {biases.shape}")
    if batch_size < 1:
        raise ESMIndexError(f"batch_size must be >= 1, got {batch_size}")
    scores = np.empty(K)
    R, C = stats.root, stats.B.shape[1]
    Wt = np.empty((d, d + 1))  # W~ = [W, b], reused
    for start in range(0, K, batch_size):
        stop = min(start + batch_size, K)
        s2 = np.zeros((stop - start, d))
        z2 = np.zeros((stop - start, C, d))
        for i, k in enumerate(range(start, stop)):
            W = np.asarray(weights[k])
            if W.shape != (d, d):
                raise ESMIndexError(f"ESM {k}: expected a ({d}, {d}) weight matrix, got {W.shape}")
            Wt[:, :d], Wt[:, d] = W, biases[k]
            if not np.isfinite(Wt).all():
                s2[i] = np.nan
                continue
            P = Wt @ R
            try:
                s2[i], V = np.linalg.eigh(P @ P.T)
            except np.linalg.LinAlgError:  # eigh did not converge: report, do not raise
                s2[i] = np.nan
                continue
            z2[i] = (V.T @ (Wt @ stats.B)).T ** 2
        scores[start:stop] = _fixed_point(s2, z2, np.broadcast_to(stats.yy, (stop - start, C)), stats.n, d)
    return scores
