"""The prefilter: a FAISS search for the sources whose ESMs the target's evidence favours, to first order.

Why these vectors. ESM-LogME is the evidence E of a Bayesian linear model on F = X~ W~^T. It depends on an
ESM only through M = W~^T W~ (the kernel X~ M X~^T). Each source is kept as the matrix logarithm
L = log(M / |M|_F + floor I) (log-Euclidean coordinates; the floor because M has rank d of d + 1) and its
log scale s = log |M|_F, and the target's evidence is linearised in both at the pool's mean (L0, s0):
E + <L - L0, dE/dL> + (s - s0) dE/ds (Frobenius inner products), which FAISS serves. The evidence
responds to the map's spectrum roughly multiplicatively, so it is far more linear in log M than in M: on
a pool derived from real ESMs the same linearisation in M kept 0.78 of the exact top 5 within the top
100, in log M 0.95 (BENCHMARKS.md, "Query prefilter"). The scale matters only for targets with fewer
examples than dimensions: thuml's evidence has d/2 log alpha for d weights while only min(n, d)
eigenvalues enter its log-determinant. M -> c M keeps the fit with alpha -> c alpha, so d/2 log alpha
gains d/2 log c and the log-determinant min(n, d)/2 log c: at the fixed point dE/ds = (d - n)/(2n)
exactly for n < d, the same for every target of n examples, and zero for n >= d. On 10^4 maps derived
from real ESMs and targets of 200 examples, s alone explains 54-84% of the exact scores' variance, and
without it the first pass ranked their exact top 5 at 2,300-10,000 of 10,000 (BENCHMARKS.md, "The map's
scale").

vec(L) has (d+1)(d+2)/2 entries (74,305 at d = 384), so each source keeps only its coordinates on the
`rank` principal directions of the pool's L (a PCA trained on a seeded sample of at most `train_max`
sources, as FAISS trains its PCAMatrix or IVF quantiser), then s - s0; the target's query vector is dE/dL
on the same directions, then dE/ds. For a pool of at most rank + 1 sources the coordinates are exact.
Only W and b are needed, so imported ESMs without source texts are prefiltered alike. The first pass's
best screen * sqrt(N) (30 sqrt(N) by default) go on to the second stage (surrogate.py), which picks
those rescored exactly. For a target with fewer examples than dimensions the evidence is also strongly
curved around the pool's mean, so the first pass is calibrated there: a + b <q, x> + c |x|^2, fitted to
the exact scores of `calibration` sources (`calibrated_search`; query.choose decides when).

Everything here is derived data, saved in `prefilter.npz` with the store's generation: the basis, every
source's coordinates and the FAISS index over them (exhaustive while the pool is small, IVF beyond
`exact_max`). A stale prefilter is brought up to date by projecting new sources on its basis and
dropping removed ones; the basis is retrained when the pool has doubled since it was trained (until it
was trained on `train_max` sources).
"""

import math
import os
import tempfile
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path

import numpy as np

from .errors import ESMIndexError
from .logme import single_threaded_blas
from .surrogate import least_anchors

INDEX_FILE = "prefilter.npz"  # basis, coordinates, FAISS index and generation, in one file
KIND = "log-moments-scale"  # what the saved coordinates are; a file of another kind is rebuilt
LOG_FLOOR = 1e-6  # added to the eigenvalues of M / |M|_F before the log (M is singular)
MOMENT_BATCH = 64  # ESMs whose d x d second moments are held at once


@dataclass
class PrefilterConfig:
    """Kept in the store's metadata: the basis's size and training sample, and FAISS's search settings."""

    rank: int = 64  # principal directions of the log maps: the FAISS vectors' width
    train_max: int = 2048  # sources the basis is trained on at most (a seeded sample beyond)
    seed: int = 0  # of that sample and of the IVF training sample
    exact_max: int = 50_000  # up to this many sources FAISS searches exhaustively (IndexFlatIP)
    nprobe: int = 64  # IVF lists visited per search beyond exact_max at least (with 4 sqrt(N) lists; more if
    # the screen needs them: lists holding twice the screen on average)
    screen: float = 30.0  # FAISS passes screen * sqrt(N) candidates (at least the budget) to the second stage
    anchors: int = 24  # of those, spread ones rescored exactly first (surrogate.py)
    local_rank: int = 8  # the second stage's local coordinates: its model's inputs
    batch: int = 8  # then rescored this many at a time, the model refitted after each
    calibration: int = 32  # for targets of fewer examples than dimensions: sources rescored to
    # calibrate the first pass (0: never)

    def __post_init__(self):
        for f in fields(self):
            value, least = getattr(self, f.name), 0 if f.name in ("seed", "exact_max", "calibration") else 1
            if f.name == "screen":
                if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
                    raise ESMIndexError(f"prefilter setting 'screen' must be a positive number, got {value!r}")
            elif not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ESMIndexError(f"prefilter setting {f.name!r} must be an integer >= {least}, got {value!r}")
        if self.anchors < least_anchors(self.local_rank):
            raise ESMIndexError(f"prefilter setting 'anchors' must be at least {least_anchors(self.local_rank)} "
                                f"at local_rank {self.local_rank} (the model's trend has local_rank + 2 "
                                f"coefficients), got {self.anchors}")

    def screened(self, pool, budget):
        """How many candidates FAISS passes to the second stage for a pool of `pool` sources: screen * sqrt(N),
        because the first pass ranks a dense pool's best ever deeper (at 200-1,500 of 10^4 and 1,800-10,000
        of 10^5 derived maps), and at least the budget."""
        return max(round(self.screen * math.sqrt(pool)), budget)

    @classmethod
    def from_meta(cls, settings):
        """The config of an index's metadata; settings of earlier prefilters (sketches) are ignored."""
        return cls(**{f.name: settings[f.name] for f in fields(cls) if f.name in settings})


def _pack(matrix):
    """Upper triangles of symmetric matrices, off-diagonals times sqrt 2: <pack(A), pack(B)> = tr(A B)."""
    rows, cols = np.triu_indices(matrix.shape[-1])
    return matrix[..., rows, cols] * np.where(rows == cols, 1.0, np.sqrt(2.0))


def _unpack(packed, size):
    rows, cols = np.triu_indices(size)
    matrix = np.zeros((size, size))
    matrix[rows, cols] = packed / np.where(rows == cols, 1.0, np.sqrt(2.0))
    return matrix + np.triu(matrix, 1).T


def normalised_moments(weights, biases):
    """M / |M|_F and log |M|_F, M = W~^T W~, of ESMs (k, d, d), (k, d): (k, d + 1, d + 1) and (k,) float64."""
    Wt = np.concatenate([np.asarray(weights, np.float64), np.asarray(biases, np.float64)[..., None]], axis=-1)
    M = np.swapaxes(Wt, -1, -2) @ Wt
    norms = np.maximum(np.linalg.norm(M, axis=(-2, -1)), 1e-30)
    return M / norms[:, None, None], np.log(norms)


def log_moments(weights, biases):
    """ESMs (k, d, d), (k, d) as the prefilter sees them, (k, T + 1) float32: packed
    log(M / |M|_F + LOG_FLOOR I), M = W~^T W~, then the log scale log |M|_F."""
    normalised, scales = normalised_moments(weights, biases)
    return np.column_stack([packed_log(normalised), scales]).astype(np.float32)


def packed_log(M):
    """Packed log(M + LOG_FLOOR I) of positive semi-definite matrices (k, n, n): (k, T) float32."""
    values, vectors = np.linalg.eigh(M)
    logs = np.log(np.clip(values, 0, None) + LOG_FLOOR)
    return _pack((vectors * logs[..., None, :]) @ np.swapaxes(vectors, -1, -2)).astype(np.float32)


def exp_chain(gradient, values, vectors):
    """dE/dL at L = V diag(values) V^T from G = dE/dM at M = exp(L): V (Gamma o V^T G V) V^T, Gamma the
    divided differences of exp at the eigenvalues (Daleckii-Krein), computed as exp(l_j) expm1(l_i - l_j)
    / (l_i - l_j) so that close eigenvalues lose no precision."""
    delta = values[:, None] - values[None, :]
    same = delta == 0
    gamma = np.exp(values)[None, :] * np.where(same, 1.0, np.expm1(delta) / np.where(same, 1.0, delta))
    return vectors @ (gamma * (vectors.T @ gradient @ vectors)) @ vectors.T


def evidence_gradient(X, Y, values, vectors):
    """dE/dM at M0 = vectors diag(values) vectors^T of LogME's class-averaged evidence (times n) for target
    embeddings X (n, d) and label columns Y (n, C), alpha and beta at their fixed point for M0 (and moving
    with M). O(n d^2 + C d^2), never an n x n matrix.

    With S = X~ M X~^T, t = alpha / beta and R = (S + t I)^-1, per column y:
    - at fixed alpha and beta, dE/dS = alpha/2 R y y^T R - R/2 (the Gaussian marginal likelihood's gradient);
    - the fixed point g1 = alpha (m2 + eps) - gamma = 0, g2 = beta (res2 + eps) - (n - gamma) = 0 moves alpha
      and beta with S (implicit function theorem); that adds (dE/dalpha, dE/dbeta) d(alpha, beta)/dS, which
      vanishes when n > d but not when n < d: thuml's evidence has d/2 log alpha for d weights while only
      min(n, d) eigenvalues (zero or not) enter its log-determinant, (d - n)/2 log alpha beyond the marginal
      likelihood.
    The pieces are gamma, m2 = y^T S R^2 y and res2 = t^2 y^T R^2 y, with dgamma/dS = t R^2,
    dm2/dS = -R y y^T R + t (R y y^T R^2 + R^2 y y^T R) and dres2/dS = -t^2 (R y y^T R^2 + R^2 y y^T R);
    dE/dM = X~^T dE/dS X~."""
    from .logme import RIDGE, _eigen_forms, _fixed_point, _kept, _zeros

    n, d = X.shape
    Xt = np.hstack([X, np.ones((n, 1))])
    U, s, _ = np.linalg.svd(Xt @ (vectors * np.sqrt(np.clip(values, 0, None))), full_matrices=False)
    s2 = s**2
    keep = _kept(s2, n, d)
    width = max(d, int(keep.sum()))  # features of F: M0 has rank d + 1, the maps d
    zeros = _zeros(keep, n, width)  # rounding-level eigenvalues: log(alpha) each in the log-determinant
    U, s2 = U[:, keep], s2[keep]
    Uy = U.T @ Y  # (k, C): F's left singular vectors against each label column
    x2 = (Uy**2).T
    yy = (Y * Y).sum(0)
    res_x2 = np.maximum(yy - x2.sum(1), 0.0)  # energy of each y outside the span of F
    alpha, beta, _, _ = _fixed_point(s2, _eigen_forms(s2, s2 * x2), yy, n)
    t = alpha / beta
    r = 1 / (s2 + t[:, None])  # (C, k): R on the span of F; beyond it R = 1 / t
    XU = Xt.T @ U
    outside = Xt.T @ Y - XU @ Uy  # X~^T (I - U U^T) y per column
    p = XU @ (r * Uy.T).T + outside / t  # (d+1, C): X~^T R y
    q = XU @ (r**2 * Uy.T).T + outside / t**2  # X~^T R^2 y

    # the fixed point's quantities at (alpha, beta), their t-derivatives, and its 2 x 2 Jacobian per column
    gamma, m2 = (s2 * r).sum(1), (s2 * x2 * r**2).sum(1)
    res2 = (x2 * (t[:, None] * r) ** 2).sum(1) + res_x2
    dgamma, dm2 = -(s2 * r**2).sum(1), -2 * (s2 * x2 * r**3).sum(1)
    dres2 = 2 * t * (s2 * x2 * r**3).sum(1)
    jacobian = np.empty((len(t), 2, 2))
    jacobian[:, 0, 0] = m2 + RIDGE + (alpha * dm2 - dgamma) / beta
    jacobian[:, 0, 1] = -(alpha * dm2 - dgamma) * t / beta
    jacobian[:, 1, 0] = dres2 + dgamma / beta
    jacobian[:, 1, 1] = res2 + RIDGE - (beta * dres2 + dgamma) * t / beta
    e_alpha = (width - zeros) / (2 * alpha) - r.sum(1) / (2 * beta) - m2 / 2
    e_beta = (n - gamma) / (2 * beta) - res2 / 2
    a, b = -np.linalg.solve(np.swapaxes(jacobian, 1, 2), np.stack([e_alpha, e_beta], 1)[..., None])[..., 0].T

    # per column: pp p p^T + pq (p q^T + q p^T) + X~^T (R-shaped terms) X~, then the class average
    pp, pq, rq = alpha / 2 - a * alpha, a * alpha * t - b * beta * t**2, (b - a) * t
    gradient = (p * pp) @ p.T + (p * pq) @ q.T + (q * pq) @ p.T
    gradient += (XU * (rq[:, None] * r**2 - r / 2).sum(0)) @ XU.T
    gradient += (rq / t**2 - 1 / (2 * t)).sum() * (Xt.T @ Xt - XU @ XU.T)
    return gradient / len(t)


@dataclass
class Basis:
    """The trained part of the prefilter: the mean log map and the principal directions around it, and the
    mean log scale."""

    mean: np.ndarray  # (T,) float32, packed L0
    components: np.ndarray  # (r, T) float32, orthonormal rows (one zero row when the pool has no spread)
    trained_on: int  # sources in the training sample
    scale: float  # s0, the mean log scale

    @classmethod
    def fit(cls, moments, rank):
        """PCA of log moments (n, T + 1) (`log_moments`: the last column is the scale) through their n x n
        Gram matrix (n <= train_max, T ~ d^2 / 2)."""
        packed = moments[:, :-1]
        mean = packed.mean(0, dtype=np.float64)
        centred = packed - mean.astype(np.float32)
        values, vectors = np.linalg.eigh((centred @ centred.T).astype(np.float64))
        top = np.argsort(values)[::-1][:rank]
        top = top[values[top] > max(values.max(), 0) * 1e-5]  # beyond: float32 rounding
        components = (vectors[:, top].T @ centred) / np.sqrt(values[top])[:, None]
        if not len(top):  # identical maps: one direction that every vector and query is zero on
            components = np.zeros((1, packed.shape[1]))
        return cls(mean.astype(np.float32), components.astype(np.float32), len(packed),
                   float(moments[:, -1].mean(dtype=np.float64)))

    def fits(self, dim, config, pool):
        """Whether this basis still serves a pool of `pool` sources of dimension `dim` under `config`: it is
        retrained when the pool has doubled since training, until it was trained on train_max sources."""
        return (self.mean.shape == ((dim + 1) * (dim + 2) // 2,) and self.components.shape[0] <= config.rank
                and (self.trained_on >= config.train_max or pool < 2 * self.trained_on))

    def coordinates(self, moments):
        """Log moments (n, T + 1) -> coordinates (n, r + 1): on the principal directions, then s - s0."""
        on_directions = (moments[:, :-1] - self.mean) @ self.components.T
        return np.column_stack([on_directions, moments[:, -1] - self.scale]).astype(np.float32)

    @cached_property
    def centre(self):
        """Eigenvalues and eigenvectors of L0, the mean log map: the query's expansion point exp(L0)."""
        size = round(np.sqrt(2 * len(self.mean) + 0.25) - 0.5)
        return np.linalg.eigh(_unpack(self.mean.astype(np.float64), size))

    def query(self, X, Y):
        """The target's query vector (times n, as evidence_gradient): the evidence gradient in L at the
        mean log map on the principal directions, then the exact slope in the log scale, (d - n)/2 for
        n < d and 0 beyond (module docstring; <dE/dM, M> at exp(L0) would add up to 1 through the floor,
        which makes exp(L0) full rank). Single-threaded BLAS: on these sizes threads gain little and, on a
        loaded machine, collapse."""
        X = np.asarray(X, np.float64)
        values, vectors = self.centre
        with single_threaded_blas():
            gradient = evidence_gradient(X, Y, np.exp(values), vectors)
            on_directions = self.components @ _pack(exp_chain(gradient, values, vectors)).astype(np.float32)
        along_scale = max(X.shape[1] - len(X), 0) / 2
        return np.append(on_directions, along_scale).astype(np.float32)


class Prefilter:
    """Every source's coordinates on the basis, in a FAISS inner-product index, at one store generation."""

    def __init__(self, basis, ids, vectors, index, generation):
        self.basis = basis  # None for an empty store
        self.ids = ids  # (N,) int64, ascending
        self.vectors = vectors  # (N, r + 1) float32: r principal coordinates, then the log scale
        self.index = index
        self.generation = generation

    @classmethod
    def build(cls, store, previous=None, reuse=True):
        """The prefilter of the store's current state. With `previous` (an older prefilter of the same store)
        its basis is kept unless the pool has doubled since it was trained, and with `reuse` so are the
        coordinates of the sources it already holds: only new sources' maps are read."""
        with store.begin() as txn:
            meta = store.meta(txn)
            config = PrefilterConfig.from_meta(meta["prefilter"])
            table = store.id_table(txn)
            ids = np.array(sorted(table), np.int64)
            basis = None if previous is None else previous.basis
            known = {}
            if basis is not None and not basis.fits(meta["dim"], config, len(ids)):
                basis = None
            if basis is None and len(ids):
                sample = ids
                if len(ids) > config.train_max:
                    rng = np.random.default_rng(config.seed)
                    sample = np.sort(rng.choice(ids, config.train_max, replace=False))
                moments = np.concatenate(list(_moments(store, txn, [table[i] for i in sample])))
                basis = Basis.fit(moments, config.rank)
                known = dict(zip(sample.tolist(), basis.coordinates(moments)))  # the sample's maps, read once
            elif reuse and basis is not None:
                known = dict(zip(previous.ids.tolist(), previous.vectors))
            new = [i for i in ids.tolist() if i not in known]
            if new:
                batches = _moments(store, txn, [table[i] for i in new])
                known.update(zip(new, np.concatenate([basis.coordinates(moments) for moments in batches])))
        width = 0 if basis is None else basis.components.shape[0] + 1
        vectors = np.stack([known[i] for i in ids.tolist()]) if len(ids) else np.zeros((0, width), np.float32)
        return cls(basis, ids, vectors, faiss_index(vectors, ids, config), meta["generation"])

    def save(self, folder):
        """Write everything as one file: to a private temporary file, then renamed over the old one, so
        concurrent savers or a kill mid-write never leave a torn or mislabelled prefilter."""
        import faiss

        arrays = {"kind": KIND, "generation": self.generation, "ids": self.ids, "vectors": self.vectors}
        if self.index is not None:
            arrays["index"] = faiss.serialize_index(self.index)
        if self.basis is not None:
            arrays.update(mean=self.basis.mean, components=self.basis.components, trained_on=self.basis.trained_on,
                          scale=self.basis.scale)
        folder = Path(folder)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=INDEX_FILE + ".", suffix=".tmp", delete=False) as file:
            try:
                np.savez(file, **arrays)
                os.fchmod(file.fileno(), 0o644)  # readable like the store beside it (temporary files are 0600)
            except BaseException:
                Path(file.name).unlink()
                raise
        Path(file.name).replace(folder / INDEX_FILE)

    @classmethod
    def load(cls, folder):
        """The persisted prefilter, or None when it is missing or unreadable."""
        import faiss

        try:
            with np.load(Path(folder) / INDEX_FILE, allow_pickle=False) as saved:
                if str(saved["kind"]) != KIND:
                    return None
                basis = None
                if "mean" in saved:
                    basis = Basis(saved["mean"], saved["components"], int(saved["trained_on"]), float(saved["scale"]))
                index = faiss.deserialize_index(saved["index"]) if "index" in saved else None
                return cls(basis, saved["ids"], saved["vectors"], index, int(saved["generation"]))
        except Exception:  # missing, truncated, foreign or from an earlier version: all mean "rebuild it"
            return None

    @classmethod
    def for_store(cls, store):
        """The prefilter matching the store's generation: loaded if fresh, else updated from the saved one
        or rebuilt (and saved if writable)."""
        prefilter = cls.load(store.path)
        if prefilter is None or prefilter.generation != store.generation:
            prefilter = cls.build(store, previous=prefilter)
            try:
                prefilter.save(store.path)
            except OSError:
                pass  # a read-only folder: keep the rebuilt index in memory
        return prefilter

    def search(self, X, Y, k):
        """Ids (int64) of the k sources whose linearised evidence for the target (embeddings X, label
        columns Y) is highest, best first, and that evidence (up to a constant)."""
        if k <= 0:
            raise ESMIndexError(f"the number of candidates must be positive, got {k}")
        if self.index is None or not self.index.ntotal:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        import faiss

        query, k = self.basis.query(X, Y), min(k, self.index.ntotal)
        params = None
        if isinstance(self.index, faiss.IndexIVF):  # visit lists holding twice the screen, on average
            lists = self.index.nlist
            nprobe = max(self.index.nprobe, math.ceil(2 * k * lists / self.index.ntotal))
            params = faiss.SearchParametersIVF(nprobe=min(lists, nprobe))
        scores, ids = self.index.search(query[None], k, params=params)
        found = ids[0] >= 0
        return ids[0][found], scores[0][found]

    @cached_property
    def radii(self):
        """Every source's squared distance from the basis's centre (the pool's mean log map; the scale
        apart), float64."""
        return (self.vectors[:, :-1].astype(np.float64) ** 2).sum(1)

    @cached_property
    def outward(self):
        """Row indices, the farthest from the centre first (target-independent: sorted once per prefilter)."""
        return np.argsort(-self.radii, kind="stable")

    def calibration_sample(self, count):
        """`count` source ids to calibrate the first pass on: half the farthest from the centre (where the
        curvature acts most), half at evenly spaced quantiles of that distance further in; all if fewer."""
        if len(self.ids) <= count:
            return self.ids.copy()
        order = self.outward
        spaced = np.linspace(count // 2, len(order) - 1, count - count // 2).round().astype(int)
        return np.sort(self.ids[np.concatenate([order[: count // 2], order[spaced]])])

    def calibrated_search(self, X, Y, k, sample, exact):
        """Like `search`, for targets whose evidence is strongly curved: with fewer examples than dimensions
        (the best maps of 100-example targets lie at the pool's rim, where the linearisation at its mean
        falls short; BENCHMARKS.md, "Second stage" and "The map's scale"). a + b <q, x> + c |x|^2 is fitted
        by least squares to the exact scores of a `sample` of sources (`calibration_sample`), and every
        source ranked by b <q, x> + c |x|^2 (|x|: its distance from the pool's mean log map, where the
        curvature acts).
        Exhaustive, over the coordinates in memory (65 floats a source: milliseconds at 10^6). Too few
        finite scores: `search`."""
        if k <= 0:
            raise ESMIndexError(f"the number of candidates must be positive, got {k}")
        finite = np.isfinite(exact)
        if finite.sum() < 4:
            return self.search(X, Y, k)
        query = self.basis.query(X, Y).astype(np.float64)
        rows = np.searchsorted(self.ids, sample[finite])
        design = np.column_stack([np.ones(len(rows)), self.vectors[rows] @ query, self.radii[rows]])
        _, slope, curvature = np.linalg.lstsq(design, exact[finite], rcond=None)[0]
        scores = self.vectors @ (slope * query) + curvature * self.radii
        top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        top = top[np.argsort(-scores[top], kind="stable")]
        return self.ids[top], scores[top]

    def coordinates_of(self, ids):
        """The stored coordinates of sources by id (ids this prefilter holds) on the principal directions:
        the FAISS vectors without the scale."""
        rows = np.searchsorted(self.ids, ids)
        if not np.array_equal(self.ids[np.minimum(rows, len(self.ids) - 1)], ids):
            raise ESMIndexError("coordinates asked for sources this prefilter does not hold")
        return self.vectors[rows, :-1]


def _moments(store, txn, names):
    """Log moments (`log_moments`) of the named sources' ESMs, MOMENT_BATCH at a time (a generator, so that
    projecting a large pool never holds more than one batch of d^2 / 2-wide moments)."""
    from .esm import ESM

    for start in range(0, len(names), MOMENT_BATCH):
        esms = [ESM.from_arrays(r.arrays) for r in store.records(names[start : start + MOMENT_BATCH], txn)]
        yield log_moments(np.stack([e.weight for e in esms]), np.stack([e.bias for e in esms]))


def faiss_index(vectors, ids, config):
    """An exhaustive inner-product index (IndexFlatIP) up to `config.exact_max` vectors, else an inverted
    file (IVF, 4 sqrt(N) lists but at least 39 vectors per list, k-means trained on a seeded sample,
    at least `config.nprobe` lists searched: `Prefilter.search` visits more when the screen needs them).
    None for an empty pool."""
    import faiss

    n, width = vectors.shape
    if not n:
        return None
    if n <= config.exact_max:
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(width))
    else:
        nlist = max(1, min(int(4 * np.sqrt(n)), n // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(width), width, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(config.seed).choice(n, min(n, 64 * nlist), replace=False)
        index.train(np.ascontiguousarray(vectors[np.sort(sample)]))
        index.nprobe = config.nprobe
    index.add_with_ids(np.ascontiguousarray(vectors, np.float32), ids)
    return index
