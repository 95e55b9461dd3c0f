"""How well the prefilter's linearised evidence ranks the real ESMs of an index, with no derived maps.

For every target task, the full-size linearised evidence in log M (the prefilter's score before its PCA,
which is exact for pools of at most 65 sources anyway) against the exact ESM-LogME scan of the index's maps:
Spearman on the whole target sample (up to 1,000 examples), and recall@5 within the top K on seeded
samples of --examples target examples (the ground truth's size).

    python tools/prefilter_real.py indexes/default --tasks data/tasks [--examples 100] [--samples 2]
"""

import argparse
import sys
from pathlib import Path

import faiss  # noqa: F401  (faiss before torch)
import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).parent))
from bench_query import targets  # noqa: E402
from pool import load_real  # noqa: E402

from esm_index.embed import DEFAULT_BASE_MODEL  # noqa: E402
from esm_index.evaluate import rank_correlation, recall_at_k  # noqa: E402
from esm_index.logme import TargetStats, encode_labels, logme_from_stats  # noqa: E402
from esm_index.prefilter import _pack, _unpack, evidence_gradient, exp_chain, log_moments  # noqa: E402


def scores(W, b, packed, centre, X, labels):
    exact = logme_from_stats(W, b, TargetStats.from_embeddings(X, labels))
    values, vectors = centre
    gradient = evidence_gradient(X, encode_labels(labels, False), np.exp(values), vectors)
    return exact, packed @ _pack(exp_chain(gradient, values, vectors))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("real", type=Path, help="index folder or folder of ESM folders")
    parser.add_argument("--tasks", type=Path, default=Path("data/tasks"))
    parser.add_argument("--cache", type=Path, default=Path("data/bench"))
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--samples", type=int, default=2, help="seeded target samples per task")
    parser.add_argument("--k", type=int, nargs="+", default=[5, 10])
    args = parser.parse_args()

    _, W, b, base_model = load_real(args.real)
    packed = log_moments(W, b)
    centre = np.linalg.eigh(_unpack(packed.mean(0, dtype=np.float64), W.shape[1] + 1))
    rng = np.random.default_rng(0)
    recall = {K: [] for K in args.k}
    print(f"{len(W)} real ESMs; chance recall@5 in the top K = K / {len(W)}")
    print("| target | Spearman (whole sample) | " + " | ".join(f"recall@5, top {K}, {args.examples} examples"
                                                           for K in args.k) + " |")
    print("|---|---|" + "---|" * len(args.k))
    with threadpool_limits(1, "blas"):
        for name, (X, labels) in targets(args.tasks, args.cache / "targets", base_model or DEFAULT_BASE_MODEL).items():
            rho = rank_correlation(*scores(W, b, packed, centre, X, labels))["spearman"]
            mine = {K: [] for K in args.k}
            for _ in range(args.samples):
                pick = rng.choice(len(X), min(args.examples, len(X)), replace=False)
                if len(np.unique(labels[pick])) < 2:
                    continue
                exact, linearised = scores(W, b, packed, centre, X[pick], labels[pick])
                for K in args.k:
                    mine[K].append(recall_at_k(exact, np.argsort(-linearised)[:K], 5))
            for K in args.k:
                recall[K] += mine[K]
            print(f"| {name} | {rho:.3f} | " + " | ".join(f"{np.mean(mine[K]):.2f}" for K in args.k) + " |")
    print("| mean | | " + " | ".join(f"{np.mean(recall[K]):.3f}" for K in args.k) + " |")


if __name__ == "__main__":
    main()
