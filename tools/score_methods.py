"""Every selection method's scores for the same (target, seed) pairs as the ground truth, with their times.

    python tools/score_methods.py data/tasks data/models indexes/default data/eval/scores.jsonl [--seeds 0 1 2]

A method sees what a user has: the seed's target training sample (the one tools/ground_truth.py trains
on) and what is stored per source. The pool is the index's sources. Methods (higher = better):
- esm_logme: ESM-LogME of every source (the exact full scan, `candidates=None`);
- esm_logme_k<K>: ESM-LogME through the FAISS prefilter with K candidates, as `ESMIndex.query` runs
  (K = 200 is the default, which covers a pool this small); sources left out score NaN (ranked last);
- logme_finetuned: LogME of the target's embeddings by each source's fine-tuned model, the expensive
  method ESMs approximate (each model is loaded and run on the target);
- textemb: cosine between the mean base embeddings of target and source (means stored in the index);
- vocab_overlap: Jaccard overlap of the lower-cased word types of target and source training texts;
- random: seeded uniform scores.
Seconds are wall time per target and include embedding the target where the method needs it;
per-source work done once at build time (ESMs, means, vocabularies) is not counted. Each line also
records the machine's 1-minute load average, since the times mean little without it.
Resumable: one JSON line per (target, seed); a line scored over the same pool is skipped. After a change to
one method (say the prefilter), `--only esm_logme_k10 esm_logme_k5` rescores just those methods in the
existing lines and rewrites the file (atomically), keeping every other method's scores and seconds.
"""

import argparse
import json
import math
import os
import re
import sys
import time
import zlib
from pathlib import Path

import faiss  # noqa: F401  (faiss before torch)
import numpy as np

from esm_index import ESMIndex
from esm_index.data import read_task
from esm_index.errors import ESMIndexError
from esm_index.logme import logme_score
from esm_index.query import DEFAULT_CANDIDATES
from ground_truth import TargetSettings, finetuned, load_model, manifest_names, target_train  # tools/, beside this file

WORD = re.compile(r"\w+")


def vocabulary(texts):
    return {w for t in texts for w in WORD.findall(t.lower())}


def source_vocabularies(tasks, models, names):
    """Word types of each source's training texts: the sample its model was fine-tuned on."""
    vocabularies = {}
    for name in names:
        tuned = finetuned(models, name)
        texts = read_task(tasks / name / "train.csv", max_examples=tuned["examples"], seed=tuned["seed"]).texts
        vocabularies[name] = vocabulary(texts)
    return vocabularies


def timed(function, *args):
    started = time.perf_counter()
    return function(*args), time.perf_counter() - started


def esm_logme(index, names, X, labels, candidates):
    """ESM-LogME scores of the pool in `names` order; NaN where the prefilter left a source out."""
    ranking = index.query_embeddings(X, labels, top_k=len(names), candidates=candidates)
    scores = {r.source: r.score for r in ranking}
    return [scores.get(n, math.nan) for n in names]


def textemb(index, names, X):
    means = np.stack([index.store.get(n, keys=["stats.base_mean"]).arrays["stats.base_mean"] for n in names])
    target = X.mean(0)
    return list(means @ target / (np.linalg.norm(means, axis=1) * np.linalg.norm(target)))


def logme_finetuned(index, names, models, texts, labels):
    return [logme_score(index.encoder.embed(texts, model=load_model(index.encoder, models / n)), labels)
            for n in names]


def vocab_overlap(names, vocabularies, texts):
    target = vocabulary(texts)
    return [len(target & vocabularies[n]) / len(target | vocabularies[n]) for n in names]


def method_names(candidates):
    """Every method score_target runs, in its order (random last)."""
    return ["esm_logme", *(f"esm_logme_k{k}" for k in candidates), "textemb", "vocab_overlap", "logme_finetuned",
            "random"]


def score_target(index, names, models, vocabularies, train, candidates, seed, target, only=None):
    """Scores and seconds of every method (or of those in `only`) for one target sample."""
    X, embed_seconds = timed(index.encoder.embed, train.texts)
    calls = [
        (esm_logme, (index, names, X, train.labels, None), True),
        *[(esm_logme, (index, names, X, train.labels, k), True) for k in candidates],
        (textemb, (index, names, X), True),
        (vocab_overlap, (names, vocabularies, train.texts), False),
        (logme_finetuned, (index, names, models, train.texts, train.labels), False),
    ]
    methods = {}
    for name, (method, args, embeds) in zip(method_names(candidates)[:-1], calls, strict=True):
        if only and name not in only:
            continue
        scores, seconds = timed(method, *args)
        methods[name] = {"scores": scores, "seconds": seconds + (embed_seconds if embeds else 0.0)}
    if not only or "random" in only:
        rng = np.random.default_rng([seed, zlib.crc32(target.encode())])
        methods["random"] = {"scores": list(rng.random(len(names))), "seconds": 0.0}
    for result in methods.values():
        result["scores"] = [None if not math.isfinite(s) else float(s) for s in result["scores"]]
        result["seconds"] = round(result["seconds"], 4)
    return methods


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tasks", type=Path, help="folder written by tools/make_tasks.py")
    parser.add_argument("models", type=Path, help="folder written by tools/finetune_sources.py")
    parser.add_argument("index", type=Path, help="index of the same sources (tools/build_default_index.py)")
    parser.add_argument("results", type=Path, help="JSON-lines file to append scores to")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--targets", nargs="+", help="only these targets (default: all in the manifest)")
    parser.add_argument("--train-examples", type=int, default=TargetSettings.train_examples,
                        help="target sample size; must match the ground truth's")
    parser.add_argument("--candidates", type=int, nargs="+", default=[DEFAULT_CANDIDATES, 20, 10, 5],
                        help="prefilter candidate counts to score with")
    parser.add_argument("--only", nargs="+", metavar="METHOD",
                        help="rescore only these methods in the existing lines of RESULTS, keeping the rest")
    args = parser.parse_args()
    if args.only:
        return refresh(args)

    settings = TargetSettings(train_examples=args.train_examples)
    targets = args.targets or manifest_names(args.tasks, "target")
    done = set()
    args.results.parent.mkdir(parents=True, exist_ok=True)
    if args.results.is_file():
        rows = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
        done = {(r["target"], r["seed"], r["train_examples"], tuple(r["sources"])) for r in rows}
    with ESMIndex.open(args.index, readonly=True) as index, open(args.results, "a") as results:
        names = sorted(index.store.names())
        if not names:
            raise ESMIndexError(f"{args.index}: the index has no sources")
        vocabularies = source_vocabularies(args.tasks, args.models, names)
        index.encoder.embed(["warm-up"])  # load the base model before any timing
        for target in targets:
            for seed in args.seeds:
                if (target, seed, args.train_examples, tuple(names)) in done:
                    continue
                train = target_train(args.tasks, target, settings, seed)
                methods = score_target(index, names, args.models, vocabularies, train, args.candidates, seed, target)
                row = {"target": target, "seed": seed, "train_examples": args.train_examples, "n_train": len(train),
                       "sources": names, "methods": methods, "load": os.getloadavg()[0]}
                results.write(json.dumps(row) + "\n")
                results.flush()
                times = ", ".join(f"{m} {r['seconds']:.2f}s" for m, r in methods.items())
                print(f"{target} seed {seed}: {times}", file=sys.stderr, flush=True)


def refresh(args):
    """Rescore the methods in args.only in every line of args.results, then replace the file atomically."""
    known = method_names(args.candidates)
    if set(args.only) - set(known):
        raise ESMIndexError(f"unknown method(s) {', '.join(sorted(set(args.only) - set(known)))}; "
                            f"known with these --candidates: {', '.join(known)}")
    rows = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
    settings = TargetSettings(train_examples=args.train_examples)
    with ESMIndex.open(args.index, readonly=True) as index:
        names = sorted(index.store.names())
        vocabularies = source_vocabularies(args.tasks, args.models, names) if "vocab_overlap" in args.only else {}
        index.encoder.embed(["warm-up"])
        for row in rows:
            if row["sources"] != names or row["train_examples"] != args.train_examples:
                raise ESMIndexError(f"{args.results}: the line for {row['target']} seed {row['seed']} was scored "
                                    "over another pool or sample size; rescore it whole instead")
            train = target_train(args.tasks, row["target"], settings, row["seed"])
            methods = score_target(index, names, args.models, vocabularies, train, args.candidates, row["seed"],
                                   row["target"], only=set(args.only))
            for result in methods.values():
                result["load"] = os.getloadavg()[0]  # the row's own "load" is that of its first scoring
            row["methods"].update(methods)
            print(f"{row['target']} seed {row['seed']}: rescored {', '.join(methods)}", file=sys.stderr, flush=True)
    temporary = args.results.with_suffix(".tmp")
    temporary.write_text("".join(json.dumps(row) + "\n" for row in rows))
    temporary.replace(args.results)


if __name__ == "__main__":
    try:
        main()
    except ESMIndexError as e:
        sys.exit(f"error: {e}")
