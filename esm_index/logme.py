"""LogME, and exact ESM-LogME rescoring from a target's sufficient statistics.

LogME (You et al., thuml/LogME `_fit_fixed_point`) needs, per label column y, only the spectrum
s2 of G = F^T F and the squared projections x2 = (V^T F^T y)^2 / s2 of y on its eigenvectors, plus
y^T y and n. For mapped features F = X~ W~^T (X~ = [X, 1], W~ = [W, b]) these follow from
A = X~^T X~ and B = X~^T Y, computed once per target: G = W~ A W~^T and F^T Y = W~ B. So each ESM
costs O(d^3) however large n is (O(r d^2) when A has rank r < d, e.g. n < d: the eigh is then r x r), and
F is never built. logme_score is the plain version on materialised F.

Rank cut-off (shared by every path here, so they agree on degenerate input): an eigenvalue s2 of G
counts as signal when its singular value sqrt(s2) > 1e-10 (thuml's rule) AND s2 > max(s2) * max(n, d) * eps
(numpy's matrix_rank tolerance applied to G); below that it is rounding, and taken as exactly zero. Zero
is not "absent": thuml keeps the min(n, d) singular values of F (when n > d, those above 1e-10), and the
rounding-level ones of a rank-deficient F (eigenvalues ~eps * ||G||, square roots ~1e-6) pass that test, so
each adds log(alpha + beta * ~0) = log alpha to its log-determinant, while their projections cancel between
the fitted and the residual energy. Here each such dimension adds exactly log alpha (`_zeros`). Dropping
them instead would move the score by log(alpha) / 2n each (~0.005 for real MiniLM ESMs, which are
rank-deficient by 2-3) and make it jump whenever a tiny genuine eigenvalue crossed the cut-off; counting
them keeps the score continuous and equal to thuml's on materialised F. The one case left where thuml's own
value depends on rounding: a map with all-zero output features and n > d, whose eigenvalues thuml's SVD
returns either as rounding (kept) or as exact zeros (dropped); eigenvalues below 1e-20 are dropped here
too, which agrees with it most of the time (10 of 13 seeded cases of 1-4 such features at d = 20), and
leaves a difference of log(alpha) / 2n per feature otherwise.
"""

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property, partial

import numpy as np
from scipy.linalg import blas, lapack
from threadpoolctl import ThreadpoolController

from esm_index.errors import ESMIndexError

EPS = np.finfo(np.float64).eps
MAX_ITERATIONS = 11  # thuml's cap
TOLERANCE = 1e-3     # on the relative change of t = alpha / beta
RIDGE = 1e-5         # thuml's epsilon in the alpha and beta updates

_BLAS = ThreadpoolController()
_BLAS_LOCK = threading.Lock()


@contextmanager
def single_threaded_blas():
    """BLAS pinned to one thread while the block runs (logme_from_stats runs its own threads; the
    prefilter's small products gain nothing from more). The setting is process-wide, so a lock keeps
    concurrent users (threads of `serve`) from interleaving it and restoring each other's values."""
    with _BLAS_LOCK, _BLAS.limit(limits=1, user_api="blas"):
        yield


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
    """Which eigenvalues of G = F^T F are signal; the others count as zeros (see the module docstring)."""
    return (s2 > 1e-20) & (s2 > s2.max(initial=0.0) * max(n, d) * EPS)


def _zeros(s2: np.ndarray, keep: np.ndarray, n: int, d: int) -> int:
    """How many of F's singular values thuml keeps that `keep` cuts: each adds log(alpha) to the evidence's
    log-determinant. thuml keeps min(n, d) of them but, when n > d, drops those at or below 1e-10 (it takes
    them from an SVD, which returns |s2|: an eigh's rounding can come out negative)."""
    dropped = int((np.abs(s2) <= 1e-20).sum()) if n > d else 0
    return max(min(n, d) - int(keep.sum()) - dropped, 0)


def _fixed_point(s2: np.ndarray, x2: np.ndarray, res_x2: np.ndarray, n: int):
    """thuml's fixed point for all label columns at once, each until its own convergence, exactly like the
    reference's loop per class. s2: (k,) kept eigenvalues of G = F^T F; x2: (C, k) squared projections
    (u_i^T y_c)^2; res_x2: (C,) energy of each y_c outside the kept span. Returns alpha, beta and the
    fitted m2 = |m|^2 and res2 = |y - F m|^2, each (C,)."""
    C = len(x2)
    alpha, beta = np.ones(C), np.ones(C)
    m2, res2 = np.zeros(C), np.zeros(C)
    live = np.arange(C)                         # columns still iterating
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for _ in range(MAX_ITERATIONS):
            t = alpha[live] / beta[live]
            u = s2 / (s2 + t[:, None])          # s2 / (s2 + t)
            v = 1.0 - u                         # 1 / (1 + s2 / t)
            xv = x2[live] * v
            gamma = u.sum(1)
            m2[live] = np.einsum("ij,ij->i", xv, u) / t             # sum s2 x2 / (t + s2)^2
            res2[live] = np.einsum("ij,ij->i", xv, v) + res_x2[live]  # sum x2 / (1 + s2/t)^2 + res_x2
            alpha[live] = gamma / (m2[live] + RIDGE)
            beta[live] = (n - gamma) / (res2[live] + RIDGE)
            live = live[~(np.abs(alpha[live] / beta[live] - t) / t <= TOLERANCE)]
            if not len(live):
                break
    return alpha, beta, m2, res2


def _evidence(s2: np.ndarray, z2: np.ndarray, yy: np.ndarray, n: int, d: int) -> float:
    """thuml's fixed-point LogME, all label columns at once; the class-averaged evidence, NaN if not finite.

    s2: (k,) eigenvalues of G = F^T F; z2: (C, k) squared projections (V^T F^T y_c)^2; yy: (C,) y_c^T y_c.
    """
    keep = _kept(s2, n, d)
    if not keep.any():
        return np.nan
    zeros = _zeros(s2, keep, n, d)              # F's rounding-level singular values: log(alpha + 0) each
    s2 = s2[keep]
    x2 = z2[:, keep] / s2                       # (u_i^T y)^2 in thuml's notation
    alpha, beta, m2, res2 = _fixed_point(s2, x2, np.maximum(yy - x2.sum(1), 0.0), n)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        logdet = np.log(alpha[:, None] + beta[:, None] * s2).sum(1) + zeros * np.log(alpha)
        evidence = (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - logdet / 2
                    - beta / 2 * res2 - alpha / 2 * m2 - n / 2 * np.log(2 * np.pi)) / n
    score = float(evidence.mean())
    return score if np.isfinite(score) else np.nan


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
    return _evidence(s2, z.T**2, (Y * Y).sum(0), n, d)


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

    def __post_init__(self):
        d1 = len(self.A)
        if self.A.shape != (d1, d1) or self.B.ndim != 2 or len(self.B) != d1 or self.yy.shape != self.B.shape[1:]:
            raise ESMIndexError(
                f"inconsistent target statistics: A {self.A.shape}, B {self.B.shape}, yy {self.yy.shape}")
        if self.n < 1:
            raise ESMIndexError(f"target statistics need n >= 1, got {self.n}")
        if not all(np.isfinite(a).all() for a in (self.A, self.B, self.yy)):
            raise ESMIndexError("target statistics contain NaN or infinity")

    @cached_property
    def factor(self) -> tuple[np.ndarray, np.ndarray]:
        """(p, L) with A[p][:, p] = L L^T, L lower trapezoidal (d+1, r), r the rank of A (pivoted Cholesky,
        which also handles a rank-deficient A; r <= n). Then G = W~ A W~^T = (W~[:, p] L)(W~[:, p] L)^T:
        a triangular product and a symmetric rank-k update, half the flops of two general products, and
        PSD by construction."""
        c, pivot, rank, _ = lapack.dpstrf(self.A, lower=1)
        return pivot - 1, np.asfortranarray(np.tril(c)[:, :rank])  # beyond rank: below rounding level


def _esm_logme(W: np.ndarray, b: np.ndarray, stats: TargetStats) -> float:
    """ESM-LogME of one ESM: G = W~ A W~^T, its eigh, z = V^T W~ B. NaN, not an exception, when W~ is
    not finite or eigh fails, so one bad ESM does not sink the batch.

    With P = (W~[:, p] L)^T of r rows, G = P^T P (d x d). When r < d (a target of fewer examples than
    dimensions) its nonzero eigenvalues are those of the r x r matrix P P^T = U S2 U^T, with eigenvectors
    v = P^T u / sqrt(s2), so z^2 = (u^T P W~ B)^2 / s2: an r x r eigh instead of d x d. (Near the rank
    cut-off z then carries a relative error ~ s_max / s, as the d x d side's eigenvalues are rounding-level
    there too.)"""
    Wt = np.concatenate([W, b[:, None]], axis=1, dtype=np.float64)
    if not np.isfinite(Wt).all():
        return np.nan
    pivot, L = stats.factor
    if L.shape[1] == len(L):
        P = blas.dtrmm(1.0, L, Wt[:, pivot].T, lower=1, trans_a=1)  # (d+1, d)
    else:
        P = L.T @ Wt[:, pivot].T  # (r, d)
    WB = Wt @ stats.B
    try:
        if len(P) < len(W):
            s2, U = np.linalg.eigh(P @ P.T)
            with np.errstate(divide="ignore", invalid="ignore"):
                z2 = ((U.T @ (P @ WB)) ** 2).T / s2  # columns of rounding-level s2 are cut by _evidence
        else:
            s2, V = np.linalg.eigh(P.T @ P)  # numpy runs this product as a symmetric rank-k update
            z2 = ((V.T @ WB) ** 2).T
    except np.linalg.LinAlgError:
        return np.nan
    return _evidence(s2, z2, stats.yy, stats.n, len(W))


def logme_from_stats(weights, biases, stats: TargetStats, batch_size=64) -> np.ndarray:
    """ESM-LogME of K ESMs f(x) = W x + b for one target, from its statistics alone.

    weights: (K, d, d) array or sequence of (d, d) arrays, any float dtype; biases: (K, d).
    Returns float64 (K,), NaN where the score is not finite (e.g. a non-finite or all-zero map).
    Each ESM costs a triangular product, a symmetric update and an eigh of d x d however large n is (of
    r x r when the target's A has rank r < d: fewer examples than dimensions). ESMs run
    in parallel threads with single-threaded BLAS: measured here, that beats threaded BLAS inside one
    eigh, and it does not collapse when other jobs load the cores; the fixed-point loop of each ESM
    is vectorised over its classes and stays in cache. batch_size ESMs are read at a time, so memory
    is O(batch_size * d^2) for their weights plus O(d^2 + C d) per thread.
    """
    d = stats.A.shape[0] - 1
    K = len(weights)
    biases = np.asarray(biases, dtype=np.float64)
    if biases.shape != (K, d):
        raise ESMIndexError(f"expected biases of shape ({K}, {d}) for {K} ESMs of dimension {d}, got {biases.shape}")
    if batch_size < 1:
        raise ESMIndexError(f"batch_size must be >= 1, got {batch_size}")
    stats.factor  # noqa: B018 - computed once, here, not raced for by the threads
    score = partial(_esm_logme, stats=stats)
    scores = np.empty(K)
    with single_threaded_blas(), ThreadPoolExecutor(min(_cpus(), batch_size)) as pool:
        for start in range(0, K, batch_size):
            ks = range(start, min(start + batch_size, K))
            Ws = [np.asarray(weights[k]) for k in ks]  # read here: the sequence may not be thread-safe
            for k, W in zip(ks, Ws):
                if W.shape != (d, d):
                    raise ESMIndexError(f"ESM {k}: expected a ({d}, {d}) weight matrix, got {W.shape}")
            scores[ks.start:ks.stop] = list(pool.map(score, Ws, biases[ks.start:ks.stop]))
    return scores


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
