"""Which compact ESM storage forms keep the ranking? Ranking fidelity on a pool of real ESMs.

The pool: the real ESMs of an index (indexes/default: 20 MiniLM ESMs, d = 384) or of a folder of ESM folders.
The targets: the target tasks of data/tasks, 600 base embeddings each (cached where tools/bench_query.py
caches them). Every target scores every ESM with ESM-LogME as each form stores it, against float32:
Spearman's rho, whether the top-5 is the same (as a set, and in order), the largest score change, and the
top-5 loss: what a changed top 5 costs in float32 scores (the true 5th score minus the lowest true score
the form puts in its top 5; compare LogME's own sampling noise, --bootstrap). A form is accepted when every
target keeps rho >= 0.99 and the same top-5 set.

Forms: the index's STORAGE_FORMS, and candidates measured and rejected, kept here to show why:
- float16: W and b rounded to float16;
- triangular intN + Rice: R of [W, b] = Q R in N-bit integer steps of each row's largest entry, Rice-coded
  (the index's integer forms with N bits): how many bits fidelity takes;
- log residual, step s: log M (M = W~^T W~ / |M|_F) minus an index-wide reference log map, in the
  reference's eigenbasis, rounded to steps of s (int8, escapes for the few larger entries; the diagonal in
  float32) and lzma-compressed; the reference is the mean log map of the other sources, as for a source
  added to an index whose reference is fixed (its one (d+1)^2 matrix per index is not counted);
- diagonal + rank r: W ~ D + U V^T by alternating least squares, U and V in float16.
A rounding form can pass on its one set of rounding errors by luck when two sources nearly tie, so each
is also encoded --realisations times with seeded subtractive dither (a uniform offset in (-1/2, 1/2) of a
step added before rounding and taken off after: errors of the same kind and size, drawn afresh); the
column "accepted, dithered" counts the realisations that pass, and "top-5 loss, dithered" says what the
swaps they make cost. A storage form is offered when its own rounding keeps every target's top 5 on every
pool measured, and rho >= 0.99 on the pools of 20 sources or more (on 8 sources a single swap of two
neighbours, however close, gives rho = 0.976), and its dithered top-5 loss stays below a tenth of LogME's
own sampling spread of the closest target's gap (--bootstrap): the sources it swaps are ones the target's
own examples cannot tell apart.
For scale, the first lines give the gap between each target's 5th and 6th source and how much that gap
moves when the target's own examples are resampled (bootstrap): LogME's sampling noise.
Bytes per source are measured on the pool's maps (the coded forms depend on the map: their mean, and the
largest source's), and given as a share of float32 at the same d. The uncompressed forms but the low-rank
one keep a fixed share of the d (d + 1) entries plus O(d) bytes, so their share is the one at d = 768,
where float32 is hf-dataset-selector's 2,362,368 bytes (the low-rank form's share halves there); for the
coded forms (Rice, lzma) it is an estimate (bits per entry measured at the pool's d).

    python tools/bench_compression.py indexes/default [--bits 8 9 10 11] [--steps 0.005 0.01] [--ranks 16 64 128]
        [--realisations 10]
    python tools/bench_compression.py data/index768_3ep --sizes-only    # bytes per source alone, any pool size

Run from the repository root (the default --tasks and --cache are relative to it).
"""

import argparse
import lzma
import sys
from pathlib import Path

import faiss  # noqa: F401  (faiss before torch: both bring OpenMP)
import numpy as np
from scipy.stats import spearmanr
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).parent))
from bench_query import targets  # noqa: E402
from pool import load_real  # noqa: E402

from esm_index.embed import set_threads  # noqa: E402
from esm_index.esm import ESM, STORAGE_FORMS, quantise_rows, rice_arrays  # noqa: E402
from esm_index.index import ESMIndex  # noqa: E402
from esm_index.logme import TargetStats, logme_from_stats  # noqa: E402

TOP = 5
FLOOR = 1e-13  # added to M / |M|_F before its log (M has rank d of d + 1); far below the prefilter's
# LOG_FLOOR, because here exp must undo the log to rounding level, not only rank maps


def scores(esms, stats):
    """ESM-LogME of each ESM (in order) for one target."""
    return logme_from_stats([e.weight for e in esms], [e.bias for e in esms], stats)


def augmented(esm):
    """W~ = [W, b] in float64."""
    return np.hstack([esm.weight, esm.bias[:, None]]).astype(np.float64)


def from_factor(F):
    """The ESM whose W~ is F: any F with F^T F = M scores as the map does (LogME is rotation invariant)."""
    return ESM(F[:, :-1], F[:, -1])


def lzma_bytes(codes):
    return len(lzma.compress(np.ascontiguousarray(codes).tobytes(), preset=9 | lzma.PRESET_EXTREME))


def rounded(x, rng):
    """Integer steps of x and the values they decode to: plain rounding, or subtractive dither from rng."""
    offset = 0.0 if rng is None else rng.uniform(-0.5, 0.5, np.shape(x))
    steps = np.round(x + offset)
    return steps, steps - offset


# -- forms: each maps the pool's ESMs to (the ESMs as decoded, bytes per source); the rounding forms take a
# dither generator too (None: plain rounding) -------------------------------------------------------------
def stored(form):
    """One of the index's STORAGE_FORMS, encoded and decoded as a store record does."""
    def encode(esms):
        arrays = [e.to_arrays(form) for e in esms]
        return [ESM.from_arrays(a) for a in arrays], [sum(x.nbytes for x in a.values()) for a in arrays]
    return encode


def half_precision(esms):
    return ([ESM(e.weight.astype(np.float16), e.bias.astype(np.float16)) for e in esms],
            [e.dim * (e.dim + 1) * 2 for e in esms])


def integer_rounded(R, bits, rng=None):
    """R rounded as the integer storage forms round it, with `bits` bits, plain or (rng) with fresh subtractive
    dither: (the R it decodes to, the codes, the rows' steps)."""
    offset = 0.0 if rng is None else rng.uniform(-0.5, 0.5, R.shape)
    codes, steps = quantise_rows(R, bits, offset)
    return np.triu((codes - offset) * steps[:, None]), codes, steps


def triangular_integer(bits):
    """R in `bits`-bit steps per row, Rice-coded, as the integer storage forms keep it (10 or 9 bits)."""
    def encode(esms, rng=None):
        decoded, sizes = [], []
        for e in esms:
            R, codes, steps = integer_rounded(np.linalg.qr(augmented(e), mode="r"), bits, rng)
            decoded.append(from_factor(R))
            sizes.append(sum(a.nbytes for a in rice_arrays(codes, steps).values()))
        return decoded, sizes
    return encode


def symmetric_function(S, f):
    values, vectors = np.linalg.eigh(S)
    return (vectors * f(values)) @ vectors.T


def log_residual(step):
    def encode(esms, rng=None):
        d = esms[0].dim
        moments = [Wt.T @ Wt for Wt in map(augmented, esms)]  # the scale too: LogME does not ignore it
        norms = [np.linalg.norm(M) for M in moments]
        logs = np.stack([symmetric_function(M / n + FLOOR * np.eye(d + 1), np.log) for M, n in zip(moments, norms)])
        total = logs.sum(0)
        upper = np.triu_indices(d + 1, 1)
        decoded, sizes = [], []
        for L, norm in zip(logs, norms):
            reference = (total - L) / (len(logs) - 1)
            basis = np.linalg.eigh(reference)[1]
            residual = basis.T @ (L - reference) @ basis
            steps, decoded_steps = rounded(residual[upper] / step, rng)
            escapes = np.abs(steps) > 127  # kept as (int32 position, int16 value)
            if np.abs(steps).max() > 32767:
                raise SystemExit(f"log-residual step {step:g} is too fine for int16 escapes")
            coded = np.diag(np.diag(residual).astype(np.float32))  # the diagonal in float32
            coded[upper] = decoded_steps * step
            coded = np.triu(coded) + np.triu(coded, 1).T
            values, vectors = np.linalg.eigh(basis @ coded @ basis.T + reference)
            decoded.append(from_factor((vectors * np.sqrt(norm * np.maximum(np.exp(values) - FLOOR, 0))).T[1:]))
            codes = np.where(escapes, -128, steps).astype(np.int8)
            sizes.append(lzma_bytes(codes) + 6 * escapes.sum() + 4 * (d + 1) + 8)
        return decoded, sizes
    return encode


def diagonal_plus_low_rank(rank, iterations=5):
    def encode(esms):
        decoded = []
        for e in esms:
            W = e.weight.astype(np.float64)
            D = np.diag(W).copy()
            for _ in range(iterations):
                U, s, Vt = np.linalg.svd(W - np.diag(D))
                low = ((U[:, :rank] * s[:rank]).astype(np.float16).astype(np.float64)
                       @ Vt[:rank].astype(np.float16).astype(np.float64))
                D = np.diag(W - low)
            decoded.append(ESM(np.diag(D) + low, e.bias))
        return decoded, [2 * rank * e.dim * 2 + 2 * e.dim * 4 for e in esms]
    return encode


def sampling_noise(esms, X, labels, reference, resamples, seed=0):
    """(gap, std): the float32 gap between the 5th and 6th source and its standard deviation when the
    target's examples are resampled with replacement: how far LogME itself would move that gap."""
    order = np.argsort(-reference)
    fifth, sixth = order[TOP - 1], order[TOP]
    rng = np.random.default_rng(seed)
    gaps = []
    for _ in range(resamples):
        pick = rng.integers(0, len(X), len(X))
        resampled = scores(esms, TargetStats.from_embeddings(X[pick], labels[pick]))
        gaps.append(resampled[fifth] - resampled[sixth])
    return reference[fifth] - reference[sixth], float(np.std(gaps))


def fidelity(decoded, stats, reference):
    """Against float32, over the targets: Spearman's rho per target, how many keep the top-5 set and its
    order, the largest score change, the top-5 loss (how far below the true 5th score, in float32 scores,
    the worst source the form puts in its top 5 lies: 0 for the same set), and whether the form passes
    (rho >= 0.99 and the same top-5 set)."""
    rhos, same_set, same_order, change, loss = [], 0, 0, 0.0, 0.0
    for target, target_stats in stats.items():
        ref, got = reference[target], scores(decoded, target_stats)
        rhos.append(spearmanr(ref, got).statistic)
        top_ref, top_got = np.argsort(-ref)[:TOP], np.argsort(-got)[:TOP]
        same_set += set(top_ref) == set(top_got)
        same_order += list(top_ref) == list(top_got)
        change = max(change, float(np.abs(got - ref).max()))
        loss = max(loss, float(ref[top_ref[-1]] - ref[top_got].min()))
    return rhos, same_set, same_order, change, loss, min(rhos) >= 0.99 and same_set == len(stats)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("real", type=Path, help="index folder or folder of ESM folders (stored in float32)")
    parser.add_argument("--tasks", type=Path, default=Path("data/tasks"))
    parser.add_argument("--cache", type=Path, default=Path("data/bench"))
    parser.add_argument("--bits", type=int, nargs="*", default=[8, 9, 10, 11],
                        help="bits per entry of the triangular integer forms")
    parser.add_argument("--steps", type=float, nargs="*", default=[0.005, 0.01], help="log-residual steps")
    parser.add_argument("--ranks", type=int, nargs="*", default=[16, 64, 128], help="diagonal + low-rank ranks")
    parser.add_argument("--bootstrap", type=int, default=20,
                        help="resamples of each target's examples for LogME's own noise (0: skip)")
    parser.add_argument("--realisations", type=int, default=10, help="dithered encodings of each rounding form")
    parser.add_argument("--threads", type=int, default=2, help="torch, faiss and BLAS threads")
    parser.add_argument("--sizes-only", action="store_true",
                        help="only the bytes per source of the index's forms (a pool of any size, no targets)")
    args = parser.parse_args()
    if any(not 2 <= bits <= 24 for bits in args.bits):
        parser.error("--bits: each between 2 and 24 (the Rice coder's range)")
    set_threads(args.threads)
    threadpool_limits(args.threads)

    if (args.real / "data.mdb").is_file():
        with ESMIndex.open(args.real, readonly=True) as index:
            if index.meta["storage"] != "float32":
                raise SystemExit(f"{args.real}: ESMs stored as {index.meta['storage']}; the reference must be float32")
    _, W, b, base_model = load_real(args.real)
    exact = [ESM(w, c) for w, c in zip(W, b)]
    d, float32_bytes = exact[0].dim, exact[0].dim * (exact[0].dim + 1) * 4
    if args.sizes_only:
        print(f"{len(exact)} real ESMs (d={d})\n"
              "| form | bytes/source | % of float32 | smallest source | largest source |\n|---|---|---|---|---|")
        for form in STORAGE_FORMS:
            sizes = np.array(stored(form)(exact)[1])
            print(f"| {form} | {sizes.mean():,.0f} | {100 * sizes.mean() / float32_bytes:.2f}% "
                  f"| {100 * sizes.min() / float32_bytes:.2f}% | {100 * sizes.max() / float32_bytes:.2f}% |")
        return
    data = targets(args.tasks, args.cache / "targets", base_model)
    stats = {t: TargetStats.from_embeddings(X, labels) for t, (X, labels) in data.items()}
    reference = {t: scores(exact, s) for t, s in stats.items()}
    boundary = [np.sort(r)[::-1][TOP - 1] - np.sort(r)[::-1][TOP] for r in reference.values()]
    print(f"{len(exact)} real ESMs (d={d}) x {len(stats)} targets, {args.threads} threads; gap between the "
          f"{TOP}th and {TOP + 1}th score: smallest {min(boundary):.5f}, median {np.median(boundary):.5f}")
    if args.bootstrap:
        noise = {t: sampling_noise(exact, *data[t], reference[t], args.bootstrap) for t in data}
        closest = min(noise, key=lambda t: noise[t][0])
        print(f"the same gap's spread over {args.bootstrap} bootstrap resamples of each target's examples "
              f"(LogME's own sampling noise): std {np.median([std for _, std in noise.values()]):.5f} (median), "
              f"{noise[closest][1]:.5f} where the gap is smallest")
    print(f"| form | bytes/source (d={d}) | % of float32 | largest source | rho min | rho mean | same top-5 set "
          f"| same top-5 order | max score change | top-5 loss | accepted "
          f"| accepted, dithered (of {args.realisations}) | top-5 loss, dithered |\n" + "|---" * 13 + "|")
    forms = {form: stored(form) for form in STORAGE_FORMS}
    forms["float16"] = half_precision
    rounding = {f"triangular int{bits} + Rice": triangular_integer(bits) for bits in args.bits}
    rounding.update({f"log residual, step {s:g} + lzma": log_residual(s) for s in args.steps})
    forms.update(rounding)
    forms.update({f"diagonal + rank {r}": diagonal_plus_low_rank(r) for r in args.ranks})
    for name, encode in forms.items():
        decoded, sizes = encode(exact)
        rhos, same_set, same_order, change, loss, accepted = fidelity(decoded, stats, reference)
        dithered, dithered_loss = "-", "-"
        if name in rounding and args.realisations:
            runs = [fidelity(encode(exact, np.random.default_rng(seed))[0], stats, reference)
                    for seed in range(args.realisations)]
            dithered = f"{sum(run[-1] for run in runs)}/{args.realisations}"
            dithered_loss = f"{max(run[-2] for run in runs):.5f}"
        print(f"| {name} | {np.mean(sizes):,.0f} | {100 * np.mean(sizes) / float32_bytes:.2f}% "
              f"| {100 * max(sizes) / float32_bytes:.2f}% | {min(rhos):.4f} "
              f"| {np.mean(rhos):.4f} | {same_set}/{len(stats)} | {same_order}/{len(stats)} | {change:.5f} "
              f"| {loss:.5f} | {'yes' if accepted else 'no'} | {dithered} | {dithered_loss} |", flush=True)


if __name__ == "__main__":
    main()
