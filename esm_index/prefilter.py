"""The prefilter: a FAISS search for a shortlist, then a low-rank LogME that picks the candidates.

Why these vectors. ESM-LogME is the evidence of a Bayesian linear model on F = X~ W~^T, which depends on
the ESM only through M = W~^T W~ (the kernel F F^T = X~ M X~^T) and not on M's scale (the prior's alpha
absorbs it). Each source therefore keeps M seen through a fixed orthonormal basis P ((d+1) x r, the
bias coordinate included): the triangular factor T of W~P (QR: T^T T = P^T M P), computed from W and
b alone, so imported ESMs without source texts get one too.
- Stage 1, FAISS: the source vector is the normalised P1^T M P1 on the leading r1 basis directions and
  the target vector its between-class scatter in the same directions, both as upper triangles
  (off-diagonals times sqrt 2), so their inner product is tr(P1^T M P1 S_b) / norms: how much the ESM
  stretches the directions that separate the target's classes (for regression, the label-correlated
  directions). Exhaustive search while the pool is small, IVF beyond `exact_max` sources.
- Stage 2, shortlist: exact LogME of the target seen through the basis, with features X~ P T^T: an
  r-dimensional problem, O(r^3) per source from its stored factor, no d x d map read.
- Stage 3 (query.py): exact ESM-LogME of the `candidates` best by stage 2.
The FAISS index is derived data: rebuilt from the store when its generation is stale, and saved with
the search parameters it was built with.

Measured (BENCHMARKS.md, "Query prefilter"): on the real and derived pools here this fixed low-rank view predicts the
exact winners poorly (recall@5 at K = N/4 between chance and 0.65), while the evidence linearised in M
at the pool's mean map, kept at full (d+1)(d+2)/2 size, reaches 1.0: the next step, once vec(M) can be
compressed. Stage 2 is therefore off by default (`shortlist` 0): on the real pool it ranked the exact
top 5 below chance, while stage 1 alone kept half of them in its top 50 of 1,000. Pools of at most
`candidates` sources are always scanned exactly.
"""

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ESMIndexError

INDEX_FILE = "prefilter.npz"  # the serialized FAISS index and the generation it was built at, in one file
VECTOR_KEY = "prefilter.vector"  # stage 1: the FAISS vector of a source
SKETCH_KEY = "prefilter.sketch"  # stage 2: the packed triangular factor T of W~P


@dataclass
class PrefilterConfig:
    """Kept in the store's metadata: the basis, the widths of both stages and FAISS's search settings."""

    rank: int = 24  # r1: leading basis directions of the FAISS vectors (r1 (r1 + 1) / 2 wide)
    sketch_rank: int = 64  # r: basis directions of the stored sketch, for stage 2
    seed: int = 0  # of the random orthonormal basis
    shortlist: int = 0  # FAISS hits scored by stage 2; 0 or <= candidates: stage 2 off (the default: see below)
    exact_max: int = 50_000  # up to this many sources FAISS searches exhaustively (IndexFlatIP)
    nprobe: int = 64  # IVF lists visited per search beyond exact_max (with 4 sqrt(N) lists)

    def __post_init__(self):
        for name in ("rank", "sketch_rank", "seed", "shortlist", "exact_max", "nprobe"):
            value, least = getattr(self, name), 0 if name in ("seed", "shortlist", "exact_max") else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ESMIndexError(f"prefilter setting {name!r} must be an integer >= {least}, got {value!r}")

    def sketch_basis(self, dim):
        """The fixed orthonormal basis P ((d+1) x r) of this index: the sketch's directions."""
        rank = min(self.sketch_rank, dim + 1)
        q, _ = np.linalg.qr(np.random.default_rng(self.seed).standard_normal((dim + 1, rank)))
        return q

    def basis(self, dim):
        """The leading r1 directions of the sketch basis: those of the FAISS vectors."""
        return self.sketch_basis(dim)[:, : min(self.rank, self.sketch_rank, dim + 1)]


def project(weight, bias, basis):
    """W~P = W P[:d] + b P[d] for one ESM (d, d) or a stack (k, d, d): (..., d, r) in float64."""
    weight, bias = np.asarray(weight, np.float64), np.asarray(bias, np.float64)
    return weight @ basis[:-1] + bias[..., :, None] * basis[-1]


def sketch(projected):
    """The packed upper triangle of T, the triangular factor of W~P: T^T T = P^T M P. float32."""
    T = np.linalg.qr(projected, mode="r")
    rank = T.shape[-1]
    if T.shape[-2] < rank:  # a complete basis (r = d + 1) of a d x (d+1) W~P: T is square with zero rows
        T = np.concatenate([T, np.zeros(T.shape[:-2] + (rank - T.shape[-2], rank))], axis=-2)
    rows, cols = np.triu_indices(rank)
    return T[..., rows, cols].astype(np.float32)


def _unpack(packed, rank):
    rows, cols = np.triu_indices(rank)
    T = np.zeros(packed.shape[:-1] + (rank, rank))
    T[..., rows, cols] = packed
    return T


def _rank_of(width):
    rank = int((np.sqrt(8 * width + 1) - 1) / 2)
    if rank * (rank + 1) // 2 != width:
        raise ESMIndexError(f"a prefilter sketch of {width} numbers is not a packed triangle")
    return rank


def _upper(matrix):
    """Upper triangle of symmetric matrices, off-diagonal times sqrt 2 (<upper(A), upper(B)> = tr(A B)),
    normalised to unit length."""
    rows, cols = np.triu_indices(matrix.shape[-1])
    vector = matrix[..., rows, cols] * np.where(rows == cols, 1.0, np.sqrt(2.0))
    return (vector / np.maximum(np.linalg.norm(vector, axis=-1, keepdims=True), 1e-30)).astype(np.float32)


def search_vector(packed, rank):
    """Stage-1 vector of a source from its sketch: normalised P1^T M P1 = T11^T T11 on r1 directions."""
    T = _unpack(np.asarray(packed, np.float64), _rank_of(np.shape(packed)[-1]))[..., :rank, :rank]
    return _upper(np.swapaxes(T, -1, -2) @ T)


def source_arrays(weight, bias, config, dim):
    """The prefilter arrays of a store record: stage-1 vector and stage-2 sketch, from W and b alone."""
    packed = sketch(project(weight, bias, config.sketch_basis(dim)))
    return {VECTOR_KEY: search_vector(packed, config.basis(dim).shape[1]), SKETCH_KEY: packed}


class TargetQuery:
    """A target seen through the index's basis: its FAISS vector and its stage-2 scores."""

    def __init__(self, X, Y, regression, config):
        basis = config.sketch_basis(X.shape[1])
        Z = np.hstack([X, np.ones((len(X), 1))]) @ basis  # the target's coordinates in the basis
        self.A, self.B, self.yy, self.n = Z.T @ Z, Z.T @ Y, (Y * Y).sum(0), len(X)
        self.rank = basis.shape[1]
        self.vector = _upper(_scatter(Z[:, : config.basis(X.shape[1]).shape[1]], Y, regression))

    def scores(self, sketches):
        """Stage-2 scores of sources given their packed sketches (k, width): LogME of the features Z T^T,
        batched (G = T A T^T, one eigh for all), then logme's fixed point per source. NaN if not finite."""
        from threadpoolctl import threadpool_limits

        from .logme import _evidence

        T = _unpack(np.asarray(sketches, np.float64), self.rank)
        scores = np.full(len(T), np.nan)
        with threadpool_limits(1, "blas"):  # small matrices: threaded BLAS only contends (and collapses under load)
            G = T @ self.A @ np.swapaxes(T, -1, -2)
            finite = np.isfinite(G).all(axis=(1, 2))
            if finite.any():
                s2, V = np.linalg.eigh(G[finite])
                z2 = np.swapaxes(np.swapaxes(V, -1, -2) @ (T[finite] @ self.B), -1, -2) ** 2  # (k, C, r)
                scores[finite] = [_evidence(s, z, self.yy, self.n, self.rank) for s, z in zip(s2, z2)]
        return scores


def _scatter(Z, Y, regression):
    """Between-class scatter of coordinates Z (classes: one-hot Y), or for regression the outer product of
    the label-correlated directions."""
    Z = Z - Z.mean(0)
    if regression:
        cross = Z.T @ (Y - Y.mean(0)) / len(Z)
        return cross @ cross.T
    means = (Y.T @ Z) / np.maximum(Y.sum(0), 1)[:, None]  # (C, r) class means
    return (means.T * (Y.mean(0))) @ means


class Prefilter:
    """A FAISS inner-product index over the stored source vectors, tagged with the store's generation."""

    def __init__(self, index, generation):
        self.index = index
        self.generation = generation

    @classmethod
    def build(cls, store):
        """Rebuild from the store's records, reading only their prefilter vectors."""
        with store.begin() as txn:
            meta = store.meta(txn)
            ids, vectors = [], []
            for record in store.records(txn=txn, keys=[VECTOR_KEY]):
                ids.append(record.info["id"])
                vectors.append(record.arrays[VECTOR_KEY])
        config = PrefilterConfig(**meta["prefilter"])
        rank = config.basis(meta["dim"]).shape[1]
        vectors = np.stack(vectors) if vectors else np.zeros((0, rank * (rank + 1) // 2), np.float32)
        return cls(faiss_index(vectors, np.asarray(ids, np.int64), config), meta["generation"])

    def save(self, folder):
        """Write index and generation as one file: to a private temporary file, then renamed over the old
        one, so concurrent savers or a kill mid-write never leave a torn or mislabelled prefilter."""
        import faiss

        folder = Path(folder)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=INDEX_FILE + ".", suffix=".tmp", delete=False) as file:
            try:
                np.savez(file, index=faiss.serialize_index(self.index), generation=self.generation)
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
                return cls(faiss.deserialize_index(saved["index"]), int(saved["generation"]))
        except Exception:  # missing, truncated or foreign: all mean "rebuild it"
            return None

    @classmethod
    def for_store(cls, store):
        """The prefilter matching the store's generation: loaded if fresh, else rebuilt (and saved if writable)."""
        prefilter = cls.load(store.path)
        if prefilter is None or prefilter.generation != store.generation:
            prefilter = cls.build(store)
            try:
                prefilter.save(store.path)
            except OSError:
                pass  # a read-only folder: keep the rebuilt index in memory
        return prefilter

    def search(self, query, k):
        """Ids of the k sources whose vectors score highest against the query vector."""
        if k <= 0:
            raise ESMIndexError(f"the number of candidates must be positive, got {k}")
        _, ids = self.index.search(np.asarray(query, np.float32)[None], min(k, self.index.ntotal))
        return [int(i) for i in ids[0] if i >= 0]


def faiss_index(vectors, ids, config):
    """An exhaustive inner-product index (IndexFlatIP) up to `config.exact_max` vectors, else an inverted
    file (IVF, 4 sqrt(N) lists, k-means trained on a seeded sample, `config.nprobe` lists searched)."""
    import faiss

    n, width = vectors.shape
    if n <= config.exact_max:
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(width))
    else:
        nlist = int(4 * np.sqrt(n))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(width), width, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(config.seed).choice(n, min(n, 64 * nlist), replace=False)
        index.train(np.ascontiguousarray(vectors[np.sort(sample)]))
        index.nprobe = config.nprobe
    if n:
        index.add_with_ids(np.ascontiguousarray(vectors, np.float32), ids)
    return index
