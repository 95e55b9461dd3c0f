"""Which compact ESM storage forms keep the ranking? Ranking fidelity on a pool of real ESMs.

The pool: one ESM per fine-tuned source model in data/models (tools/finetune_sources.py), fitted here
(exact ridge, GCV) from base and fine-tuned MiniLM embeddings of up to --max-texts of that source's train
texts, plus base MiniLM -> sre-embedding-model on WordNet glosses (tools/esm_fidelity.py's cache, if there).
For every target in data/tasks (role "target"), every ESM is scored with ESM-LogME as stored in each form
and compared with float32: Spearman's rho of the scores and whether the top-5 is the same (as a set, and
in order). A form is accepted when every target keeps rho >= 0.99 and the same top-5 set.

Forms: the index's STORAGE_FORMS, and the candidates measured and rejected, kept here only to show
why: W and b in float16; the triangular factor R of [W, b] as int8 steps with a float32 scale per row;
W ~ D + U V^T (diagonal plus rank r by alternating least squares, U and V in float16). Bytes per source
are those of the ESM's arrays in a record (the prefilter's vectors and the statistics come on top, in
every form), at the pool's d and at d = 768, against the reference's 2,362,368 bytes.

    python tools/bench_compression.py [--max-texts 500] [--ranks 16 64 128] [--threads 2]

Embeddings are cached under data/cache/embeddings/, so a rerun (e.g. once more models exist) only embeds
what is new.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import faiss  # noqa: F401  (faiss before torch: both bring OpenMP)
import numpy as np
from esm_fidelity import CACHE, cached_embeddings
from scipy.stats import spearmanr
from threadpoolctl import threadpool_limits

from esm_index.data import read_task
from esm_index.embed import DEFAULT_BASE_MODEL, set_threads
from esm_index.esm import ESM, STORAGE_FORMS
from esm_index.logme import TargetStats, logme_from_stats

ROOT = Path(__file__).resolve().parents[1]
TOP = 5
REFERENCE_BYTES = 768 * 769 * 4  # hf-dataset-selector's float32 ESM at d = 768


def pool_esms(tasks, models, max_texts, seed):
    """name -> ESM fitted from base to fine-tuned embeddings of the source's train texts."""
    esms = {}
    for folder in sorted(p for p in models.iterdir() if (p / "done.json").is_file()):
        texts = read_task(tasks / folder.name / "train.csv", max_examples=max_texts, seed=seed).texts
        started = time.perf_counter()
        X = cached_embeddings(DEFAULT_BASE_MODEL, texts, "base-minilm")
        Y = cached_embeddings(folder, texts, f"model-{folder.name}")
        esms[folder.name] = ESM.fit(X, Y)
        fit = esms[folder.name].config["fit"]
        print(f"  {folder.name}: {len(texts)} texts, held-out R^2 {fit['heldout_r2']:.3f}, "
              f"{time.perf_counter() - started:.0f}s", file=sys.stderr, flush=True)
    glosses = [sorted(CACHE.glob(f"{model}-2400-*.npy")) for model in ("base-minilm", "sre-embedding-model")]
    if all(glosses):
        esms["sre-embedding-model"] = ESM.fit(np.load(glosses[0][0]), np.load(glosses[1][0]))
    return esms


def target_stats(tasks, max_texts, seed):
    """name -> sufficient statistics of a target's base embeddings and labels."""
    manifest = json.loads((tasks / "manifest.json").read_text())
    stats = {}
    for name in [t["name"] for t in manifest["tasks"] if t["role"] == "target"]:
        task = read_task(tasks / name / "train.csv", max_examples=max_texts, seed=seed)
        X = cached_embeddings(DEFAULT_BASE_MODEL, task.texts, "base-minilm")
        stats[name] = TargetStats.from_embeddings(X, task.labels)
    return stats


def scores(esms, stats):
    """ESM-LogME of each ESM (in order) for one target."""
    return logme_from_stats([e.weight for e in esms], [e.bias for e in esms], stats)


def stored_form(form):
    """(decode(encode(esm)), bytes of the encoding at dimension d) for a storage form of the index."""
    return (lambda esm: ESM.from_arrays(esm.to_arrays(form)),
            lambda d: sum(a.nbytes for a in ESM(np.eye(d), np.zeros(d)).to_arrays(form).values()))


def half_precision():
    """The rejected candidate: W and b rounded to float16."""
    return (lambda esm: ESM(esm.weight.astype(np.float16), esm.bias.astype(np.float16)),
            lambda d: d * (d + 1) * 2)


def triangular_int8():
    """The rejected candidate: R of [W, b] = Q R as int8 steps of one float32 scale per row."""

    def approximate(esm):
        R = np.linalg.qr(np.hstack([esm.weight, esm.bias[:, None]]).astype(np.float64), mode="r")
        scale = np.abs(R).max(1, keepdims=True) / 127
        R = np.round(R / np.where(scale > 0, scale, 1)) * scale.astype(np.float32)
        return ESM(R[:, :-1], R[:, -1])

    return approximate, lambda d: d * (d + 3) // 2 + d * 4


def diagonal_plus_low_rank(rank, iterations=5):
    """The rejected candidate: W ~ D + U V^T by alternating least squares, U and V in float16."""

    def approximate(esm):
        W = esm.weight.astype(np.float64)
        D = np.diag(W).copy()
        for _ in range(iterations):
            U, s, Vt = np.linalg.svd(W - np.diag(D))
            low = ((U[:, :rank] * s[:rank]).astype(np.float16).astype(np.float64)
                   @ Vt[:rank].astype(np.float16).astype(np.float64))
            D = np.diag(W - low)
        return ESM(np.diag(D) + low, esm.bias)

    return approximate, lambda d: 2 * rank * d * 2 + 2 * d * 4


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=Path, default=ROOT / "data" / "tasks")
    parser.add_argument("--models", type=Path, default=ROOT / "data" / "models")
    parser.add_argument("--ranks", type=int, nargs="*", default=[16, 64, 128], help="ranks of the rejected candidate")
    parser.add_argument("--max-texts", type=int, default=500, help="texts per source and per target")
    parser.add_argument("--threads", type=int, default=2, help="torch, faiss and BLAS threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    set_threads(args.threads)
    threadpool_limits(args.threads)

    print("fitting the pool of ESMs (embeddings cached)...", file=sys.stderr)
    esms = pool_esms(args.tasks, args.models, args.max_texts, args.seed)
    targets = target_stats(args.tasks, args.max_texts, args.seed)
    exact = list(esms.values())
    d = exact[0].dim
    reference = {t: scores(exact, s) for t, s in targets.items()}
    gaps = [np.abs(np.diff(np.sort(r)[::-1][: TOP + 1])).min() for r in reference.values()]
    print(f"{len(esms)} real ESMs (MiniLM, d={d}) x {len(targets)} targets, {args.threads} threads; "
          f"smallest score gap in a target's top-{TOP + 1}: {min(gaps):.5f}")
    print("| form | bytes/source (d=%d) | bytes/source (d=768) | %% of 2.36 MB | rho min | rho mean | same top-5 set "
          "| same top-5 order | max score change | accepted |\n|---|---|---|---|---|---|---|---|---|---|" % d)
    forms = {form: stored_form(form) for form in STORAGE_FORMS}
    forms.update({"float16 (candidate)": half_precision(), "triangular int8 (candidate)": triangular_int8()})
    forms.update({f"diagonal + rank {r} (candidate)": diagonal_plus_low_rank(r) for r in args.ranks})
    for name, (approximate, size) in forms.items():
        stored = [approximate(e) for e in exact]
        rhos, same_set, same_order, change = [], 0, 0, 0.0
        for target, stats in targets.items():
            ref, got = reference[target], scores(stored, stats)
            rhos.append(spearmanr(ref, got).statistic)
            top_ref, top_got = np.argsort(-ref)[:TOP], np.argsort(-got)[:TOP]
            same_set += set(top_ref) == set(top_got)
            same_order += list(top_ref) == list(top_got)
            change = max(change, float(np.abs(got - ref).max()))
        accepted = min(rhos) >= 0.99 and same_set == len(targets)
        print(f"| {name} | {size(d):,} | {size(768):,} | {100 * size(768) / REFERENCE_BYTES:.1f}% | {min(rhos):.4f} "
              f"| {np.mean(rhos):.4f} | {same_set}/{len(targets)} | {same_order}/{len(targets)} | {change:.5f} "
              f"| {'yes' if accepted else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
