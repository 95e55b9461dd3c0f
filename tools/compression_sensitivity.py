"""How much could smarter rounding save? The first-order sensitivity of ESM-LogME to the stored factor R.

The compact forms of tools/bench_compression.py round the entries of R (W~ = [W, b] = Q R, R upper
triangular) independently. A score then moves by about <g, dR>, g the gradient of the score with respect
to R's upper entries, so the rounding error's variance is sum g_ij^2 step_ij^2 / 12. Two ways to shrink it
at the same number of bits, measured here on real ESMs:
- steps shaped to the sensitivity (step_ij ~ (E g_ij^2)^-1/2, the mean over targets): saves
  1/2 log2(arithmetic / geometric mean of E g^2) bits per entry at best ("oracle": the test targets' own
  gradients), less when the shape is learnt from other targets ("calibrated": per entry, or one scale per
  row and per column, which a store could afford);
- noise shaping (error feedback as in GPTQ: rounding errors pushed out of a subspace): helps only as far
  as a new target's gradient lies in a subspace that other targets' gradients reveal. Printed: the share of
  a test target's |g|^2 in the span of the calibration targets' gradients, and in the top-k input and
  output directions of their second moment.

Entries of R's columns for inputs no target has (base-embedding dimensions that are zero for every text:
2 of MiniLM's 384) have no sensitivity at all; they are counted apart and left out of the bits (any form
could drop them).

The gradient: LogME sees R only through M = R^T R, so d score / dR = 2 R dE/dM, with dE/dM the
prefilter's closed form (esm_index.prefilter.evidence_gradient: alpha and beta at their fixed point and
moving with M, which matters when a target has fewer examples than dimensions). The first block printed
checks it against the real score change of one dithered int8 rounding.

    python tools/compression_sensitivity.py indexes/default [--esms 4] [--calibration TASK ...]

Targets: the target tasks of data/tasks; calibration: other tasks (by default 12 source tasks that are
not in the default index), base embeddings cached as tools/bench_query.py caches them.
"""

import argparse
import sys
from pathlib import Path

import faiss  # noqa: F401  (faiss before torch: both bring OpenMP)
import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).parent))
from bench_compression import augmented, from_factor, integer_rounded, scores  # noqa: E402
from bench_query import targets  # noqa: E402
from pool import load_real  # noqa: E402

from esm_index.esm import ESM  # noqa: E402
from esm_index.logme import TargetStats, encode_labels  # noqa: E402
from esm_index.prefilter import evidence_gradient  # noqa: E402

CALIBRATION = ["bible_wisdom", "chatterbot_italian", "foldoc_machines", "foldoc_theory", "food_reviews_rest",
               "fortunes_de_sayings", "fortunes_en_life", "fortunes_es_a", "fortunes_it_a", "fortunes_ru_wit",
               "wordnet_noun_mind", "wordnet_noun_social"]


class Target:
    """A target's embeddings and label columns (for the gradient) and its statistics (for the scores)."""

    def __init__(self, X, labels):
        self.X, self.Y = X, encode_labels(labels, False)
        self.stats = TargetStats.from_embeddings(X, labels)


def gradient(R, target):
    """d ESM-LogME / dR (upper entries; the rest zero) for one target: LogME sees R only through
    M = R^T R, so it is 2 R dE/dM, with dE/dM from the prefilter's evidence_gradient (times n there)."""
    values, vectors = np.linalg.eigh(R.T @ R)
    return np.triu(2 * R @ evidence_gradient(target.X, target.Y, values, vectors)) / len(target.X)


def bits_saved(weights, log_step):
    """Bits per entry that steps exp(log_step) (geometric mean kept) save against uniform steps, for
    entries whose squared sensitivities are `weights`."""
    log_step = log_step - log_step.mean()
    return 0.5 * np.log2(weights.sum() / (weights * np.exp(2 * log_step)).sum())


def row_column(values, rows, cols, d, sweeps=30):
    """values ~ a_i + c_j by least squares (alternating): one scale per row and per column."""
    a, c = np.zeros(d), np.zeros(d + 1)
    rows_n, cols_n = np.bincount(rows, minlength=d), np.maximum(np.bincount(cols, minlength=d + 1), 1)
    for _ in range(sweeps):
        a = np.bincount(rows, values - c[cols], d) / rows_n
        c = np.bincount(cols, values - a[rows], d + 1) / cols_n
    return a[rows] + c[cols]


def captured(g, basis, side):
    """Share of |g|^2 in the span of `basis`'s orthonormal columns: of g's entries, inputs or outputs."""
    projected = {"entries": lambda: basis.T @ g.ravel(), "inputs": lambda: g @ basis,
                 "outputs": lambda: basis.T @ g}[side]()
    return np.sum(projected ** 2) / np.sum(g ** 2)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("real", type=Path, help="index folder or folder of ESM folders (stored in float32)")
    parser.add_argument("--tasks", type=Path, default=Path("data/tasks"))
    parser.add_argument("--cache", type=Path, default=Path("data/bench"))
    parser.add_argument("--esms", type=int, default=4, help="how many of the pool's ESMs to analyse")
    parser.add_argument("--calibration", nargs="*", default=CALIBRATION, help="tasks the shapes are learnt on")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    threadpool_limits(args.threads)

    names, W, b, base_model = load_real(args.real)
    test = [Target(*data) for data in targets(args.tasks, args.cache / "targets", base_model).values()]
    calibration = [Target(*data) for data in targets(args.tasks, args.cache / "targets", base_model,
                                                     named=args.calibration).values()]
    picked = np.linspace(0, len(names) - 1, min(args.esms, len(names))).round().astype(int)
    print(f"{len(picked)} of {len(names)} real ESMs (d={W.shape[1]}); {len(test)} test targets, "
          f"{len(calibration)} calibration targets")

    print("\nfirst order against the real change of one dithered int8 rounding (first 4 test targets):")
    rng = np.random.default_rng(0)
    for i in picked:
        R = np.linalg.qr(augmented(ESM(W[i], b[i])), mode="r")
        rounded = integer_rounded(R, 8, rng)[0]
        pairs = [(float(np.sum(gradient(R, s) * (rounded - R))),
                  scores([from_factor(rounded)], s.stats)[0] - scores([from_factor(R)], s.stats)[0])
                 for s in test[:4]]
        print(f"  {names[i]}: " + ", ".join(f"{p:+.2e} vs {a:+.2e}" for p, a in pairs))

    print("\nbits per entry saved by steps shaped to the sensitivity, at the same error on the test targets:")
    print("| ESM | entries of no sensitivity | oracle | calibrated, per entry | calibrated, row x column "
          "| calibrated, per row |\n|---|---|---|---|---|---|")
    shares = []
    for i in picked:
        R = np.linalg.qr(augmented(ESM(W[i], b[i])), mode="r")
        d = len(R)
        g_test = [gradient(R, s) for s in test]
        g_cal = [gradient(R, s) for s in calibration]
        w_cal = np.mean([g ** 2 for g in g_cal], 0)
        rows, cols = np.nonzero(np.triu(w_cal > w_cal.max() * 1e-20))  # not the inputs no target has
        dead = d * (d + 3) // 2 - len(rows)
        w_test = np.mean([g[rows, cols] ** 2 for g in g_test], 0)
        shape = -0.5 * np.log(w_cal[rows, cols])
        per_row = np.bincount(rows, shape, d)[rows] / np.bincount(rows, minlength=d)[rows]
        print(f"| {names[i]} | {dead} | {bits_saved(w_test, -0.5 * np.log(w_test + 1e-300)):.2f} "
              f"| {bits_saved(w_test, shape):.2f} | {bits_saved(w_test, row_column(shape, rows, cols, d)):.2f} "
              f"| {bits_saved(w_test, per_row):.2f} |")
        span = np.linalg.qr(np.array([g.ravel() for g in g_cal]).T)[0]
        inputs = np.linalg.eigh(sum(g.T @ g for g in g_cal))[1][:, ::-1]
        outputs = np.linalg.eigh(sum(g @ g.T for g in g_cal))[1][:, ::-1]
        shares.append([np.mean([captured(g, span, "entries") for g in g_test])]
                      + [np.mean([captured(g, basis[:, :k], side) for g in g_test])
                         for basis, side in ((inputs, "inputs"), (outputs, "outputs")) for k in (50, 100, 200)])

    print("\nshare of a test target's |g|^2 that noise shaping could reach (mean over ESMs and test targets):")
    labels = ["span of the calibration gradients"] + [f"top {k} {side} directions of their second moment"
                                                       for side in ("input", "output") for k in (50, 100, 200)]
    for label, share in zip(labels, np.mean(shares, 0)):
        print(f"  {label}: {share:.3f}")
    print(f"  (a random subspace holds k / {W.shape[1] + 1} of the inputs, k / {W.shape[1]} of the outputs)")


if __name__ == "__main__":
    main()
