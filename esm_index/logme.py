"""LogME, and exact ESM-LogME rescoring from a target's sufficient statistics.

LogME (You et al., thuml/LogME `_fit_fixed_point`) needs, per label column y, only the spectrum
s2 of G = F^T F, y^T y, n and, at each step of its fixed point, two forms of the ridge solution
m = (G + t I)^-1 F^T y: y^T F m and |m|^2 (thuml reads them off the projections of y on G's
eigenvectors). For mapped features F = X~ W~^T (X~ = [X, 1], W~ = [W, b]) all of it follows from
A = X~^T X~ and B = X~^T Y, computed once per target: G = W~ A W~^T and F^T Y = W~ B. So each ESM
costs O(d^3) however large n is (O(r d^2) when A has rank r < d, e.g. n < d: the decomposition is then
r x r), and F is never built. The rescoring path never forms an eigenvector either: G = Q T Q^T
(tridiagonal T), F^T Y rotated by Q once, T's eigenvalues, and each form one O(d) solve with T + t I.
logme_score is the plain version on materialised F, through G's eigenvectors as thuml does.

Rank cut-off (shared by every path here, so they agree on degenerate input): an eigenvalue s2 of G
counts as signal when its singular value sqrt(s2) > 1e-10 (thuml's rule) AND s2 > max(s2) * max(n, d) * eps
(numpy's matrix_rank tolerance applied to G); below that it is rounding, and taken as exactly zero. Zero
is not "absent": thuml keeps the min(n, d) singular values of F (when n > d, those above 1e-10), and the
rounding-level ones of a rank-deficient F (eigenvalues ~eps * ||G||, square roots ~1e-6) pass that test, so
each adds log(alpha + beta * ~0) = log alpha to its log-determinant, while their projections cancel between
the fitted and the residual energy. Here each such dimension adds exactly log alpha (`_zeros`). Dropping
them instead would move the score by log(alpha) / 2n each (~0.005 for real MiniLM ESMs, which are
rank-deficient by 2-3) and make it jump whenever a tiny genuine eigenvalue crossed the cut-off; counting
them keeps the score continuous and equal to thuml's on materialised F. thuml drops only values its SVD of
F^T F returns at or below 1e-20, which rounding near eps * ||G|| hardly ever reaches (not even for
all-zero output features: 40 of 40 seeded cases of 1-4 such features at d = 20 agree). So none is dropped
here, whatever the size a decomposition gives it: both paths here compute some rounding-level eigenvalues
of a map fitted on fewer examples than dimensions far below eps * ||G|| (down to 1e-21), and a cut at
1e-20 on them (this module's earlier rule) moved scores by ~0.005 away from thuml's on a 384-d pool fitted
on 250 examples per source: 1 of 360 in the statistics path, 33 in the materialised one (now 0 and 0).
"""

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property, partial

import numpy as np
from scipy.linalg import lapack, solve_triangular
from threadpoolctl import ThreadpoolController

from esm_index.errors import ESMIndexError
from esm_index.linalg import NotPositiveDefinite, Tridiagonal, lower_transposed_product

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


def _zeros(keep: np.ndarray, n: int, d: int) -> int:
    """How many of F's min(n, d) singular values `keep` cuts: each adds log(alpha) to the evidence's
    log-determinant, as thuml keeps them (see the module docstring)."""
    return max(min(n, d) - int(keep.sum()), 0)


def _fixed_point(s2: np.ndarray, forms, yy: np.ndarray, n: int):
    """thuml's fixed point for all label columns at once, each until its own convergence, exactly like the
    reference's loop per class. s2: (k,) kept eigenvalues of G = F^T F; yy: (C,) y^T y per column;
    forms(t, cols) -> (y^T F m, |m|^2) for the columns cols, each at its own t = alpha / beta, where
    m = (G + t I)^-1 F^T y is the ridge solution. Returns alpha, beta and the fitted m2 = |m|^2 and
    res2 = |y - F m|^2 = y^T y - y^T F m - t |m|^2, each (C,)."""
    C = len(yy)
    alpha, beta = np.ones(C), np.ones(C)
    m2, res2 = np.zeros(C), np.zeros(C)
    live = np.arange(C)                         # columns still iterating
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for _ in range(MAX_ITERATIONS):
            t = alpha[live] / beta[live]
            gamma = (s2 / (s2 + t[:, None])).sum(1)
            fitted, m2[live] = forms(t, live)
            res2[live] = np.maximum(yy[live] - fitted - t * m2[live], 0.0)
            alpha[live] = gamma / (m2[live] + RIDGE)
            beta[live] = (n - gamma) / (res2[live] + RIDGE)
            live = live[~(np.abs(alpha[live] / beta[live] - t) / t <= TOLERANCE)]
            if not len(live):
                break
    return alpha, beta, m2, res2


def _eigen_forms(s2: np.ndarray, z2: np.ndarray):
    """The fixed point's forms from G's kept eigenvalues s2 (k,) and the squared projections
    z2 (C, k) = (v_i^T F^T y)^2 of each label column on their eigenvectors."""
    def forms(t, cols):
        r = 1.0 / (s2 + t[:, None])
        fitted = z2[cols] * r                   # z2 / (s2 + t)
        return fitted.sum(1), (fitted * r).sum(1)
    return forms


def _tridiagonal_forms(M: np.ndarray, c: np.ndarray, kernel: bool):
    """Eigenvalues of the symmetric M and the fixed point's forms, without eigenvectors.

    M = Q T Q^T with T tridiagonal and c -> Q^T c; T's eigenvalues come from the root-free QR, and each
    form is one O(k) solve x = (T + t I)^-1 c. Either M = G and c = F^T y: y^T F m = c^T x, |m|^2 = x^T x;
    or (`kernel`) M = P P^T and c = beta for G = P^T P and F^T y = P^T beta: y^T F m = x^T T c and
    |m|^2 = x^T T x (push-through). Under half the cost of an eigh (4.7 against 12.3 ms at d = 384), and
    no eigenvector is formed.
    The forms raise linalg.NotPositiveDefinite when t is below T's rounding."""
    if not len(M):
        return np.zeros(0), None  # no spectrum: _evidence returns NaN before any form is needed
    T = Tridiagonal.of(M)
    c = T.rotate(c)
    Tc = T.times(c) if kernel else c

    def forms(t, cols):
        x = T.solve_shifted(t, c[:, cols])
        return (Tc[:, cols] * x).sum(0), (x * (T.times(x) if kernel else x)).sum(0)
    return T.eigenvalues(), forms


def _evidence(s2: np.ndarray, forms, yy: np.ndarray, n: int, d: int) -> float:
    """thuml's fixed-point LogME, all label columns at once; the class-averaged evidence, NaN if not finite.

    s2: (k,) eigenvalues of G = F^T F; forms: see _fixed_point (a rounding-level eigenvalue's direction
    adds only rounding to them); yy: (C,) y_c^T y_c.
    """
    keep = _kept(s2, n, d)
    if not keep.any():
        return np.nan
    zeros = _zeros(keep, n, d)                  # F's rounding-level singular values: log(alpha + 0) each
    s2 = s2[keep]
    alpha, beta, m2, res2 = _fixed_point(s2, forms, yy, n)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        logdet = np.log(alpha[:, None] + beta[:, None] * s2).sum(1) + zeros * np.log(alpha)
        evidence = (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - logdet / 2
                    - beta / 2 * res2 - alpha / 2 * m2 - n / 2 * np.log(2 * np.pi)) / n
    score = float(evidence.mean())
    return score if np.isfinite(score) else np.nan


def _eigen_evidence(s2, z, yy, n, d) -> float:
    """_evidence from an eigendecomposition: z (k, C) = V^T F^T Y; cut eigenvalues' directions dropped."""
    keep = _kept(s2, n, d)
    return _evidence(s2, _eigen_forms(s2[keep], (z[keep].T) ** 2), yy, n, d)


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
    return _eigen_evidence(s2, z, (Y * Y).sum(0), n, d)


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

    @cached_property
    def coefficients(self) -> np.ndarray:
        """beta (r, C) with B[p] = L beta: B = X~^T Y lies in the span of A = X~^T X~, so for any map
        W~ B = W~[:, p] L beta = P^T beta (the kernel side of _esm_logme)."""
        pivot, L = self.factor
        rank = L.shape[1]
        return solve_triangular(L[:rank], self.B[pivot[:rank]], lower=True)


def _esm_logme(W: np.ndarray, b: np.ndarray, stats: TargetStats) -> float:
    """ESM-LogME of one ESM from G = W~ A W~^T = P^T P and F^T Y = W~ B, with P = (W~[:, p] L)^T of r rows.
    NaN, not an exception, when W~ is not finite or a decomposition fails, so one bad ESM does not sink the
    batch.

    G is tridiagonalised and each label column's forms solved on it (_tridiagonal_forms). When r < d (a
    target of fewer examples than dimensions) the r x r kernel side P P^T is decomposed instead: it has G's
    nonzero eigenvalues, and F^T Y = W~ B = P^T beta (stats.coefficients). Should the fixed point drive t
    below the decomposition's rounding, G's eigenvectors are formed after all and its cut directions
    dropped (thuml's semantics, see the module docstring)."""
    Wt = np.concatenate([W, b[:, None]], axis=1, dtype=np.float64)
    if not np.isfinite(Wt).all():
        return np.nan
    pivot, L = stats.factor
    if L.shape[1] == len(L):
        P = lower_transposed_product(L, Wt[:, pivot].T)  # (d+1, d)
    else:
        P = L.T @ Wt[:, pivot].T  # (r, d)
    n, d = stats.n, len(W)
    try:
        try:
            if len(P) < d:
                s2, forms = _tridiagonal_forms(P @ P.T, stats.coefficients, kernel=True)
            else:
                s2, forms = _tridiagonal_forms(P.T @ P, Wt @ stats.B, kernel=False)
            return _evidence(s2, forms, stats.yy, n, d)
        except NotPositiveDefinite:
            s2, V = np.linalg.eigh(P.T @ P)  # numpy runs this product as a symmetric rank-k update
            return _eigen_evidence(s2, V.T @ (Wt @ stats.B), stats.yy, n, d)
    except np.linalg.LinAlgError:
        return np.nan


def logme_from_stats(weights, biases, stats: TargetStats, batch_size=64) -> np.ndarray:
    """ESM-LogME of K ESMs f(x) = W x + b for one target, from its statistics alone.

    weights: (K, d, d) array or sequence of (d, d) arrays, any float dtype; biases: (K, d).
    Returns float64 (K,), NaN where the score is not finite (e.g. a non-finite or all-zero map).
    Each ESM costs a triangular product, a symmetric update and a tridiagonalisation of d x d however
    large n is (of r x r when the target's A has rank r < d: fewer examples than dimensions). ESMs run
    in parallel threads with single-threaded BLAS (esm_index.linalg: the LAPACK calls release the GIL):
    measured here, that beats threaded BLAS inside one decomposition, and it does not collapse when other
    jobs load the cores; the fixed-point loop of each ESM is vectorised over its classes and stays in
    cache. batch_size ESMs are read at a time, so memory is O(batch_size * d^2) for their weights plus
    O(d^2 + C d) per thread.
    """
    d = stats.A.shape[0] - 1
    K = len(weights)
    biases = np.asarray(biases, dtype=np.float64)
    if biases.shape != (K, d):
        raise ESMIndexError(f"expected biases of shape ({K}, {d}) for {K} ESMs of dimension {d}, got {biases.shape}")
    if batch_size < 1:
        raise ESMIndexError(f"batch_size must be >= 1, got {batch_size}")
    stats.factor, stats.coefficients  # noqa: B018 - computed once, here, not raced for by the threads
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
