"""How well does one affine map approximate real fine-tuning, and what does each way of fitting it cost?

Base MiniLM -> `sre-embedding-model` (the same MiniLM fine-tuned elsewhere, on SRE text pairs), mean-pooled
embeddings of WordNet noun glosses; the held-out split is the one `ESM.fit` uses. Prints held-out R^2,
MSE, mean cosine and the seconds of the final fit on all rows (best of --repeats), for no map, the exact
ridge fit (ridge by generalized cross-validation, and several fixed ones) and the paper's AdamW (its
lr 1e-3, and hf-dataset-selector's default 1e-2). With --rows near the dimension (e.g. 600 of the
embedded texts) it shows why the ridge must be chosen: a small fixed one overfits.

    python tools/esm_fidelity.py [--texts 2400] [--rows 2400] [--heldout 400] [--threads 2] [--repeats 3]

Embeddings are cached under data/cache/embeddings/ (keyed by model and texts), so reruns only fit.
"""

import argparse
import hashlib
import sys
from pathlib import Path

import faiss  # noqa: F401  (faiss before torch: both bring OpenMP)
import numpy as np
from threadpoolctl import threadpool_limits

from esm_index.embed import DEFAULT_BASE_MODEL, Encoder, set_threads
from esm_index.esm import ESM, ESMFitConfig, fit_quality, holdout_split

CACHE = Path(__file__).resolve().parents[1] / "data" / "cache" / "embeddings"
WORDNET_NOUNS = Path("/usr/share/wordnet/data.noun")


def sre_model_path():
    import sre_embedding_model

    return Path(sre_embedding_model.__file__).parent / "model_weights"


def wordnet_glosses(count, seed=0, path=WORDNET_NOUNS):
    """A seeded sample of distinct WordNet noun glosses (the text after `|` on each synset line)."""
    glosses = sorted({line.split(" | ", 1)[1].strip() for line in path.read_text().splitlines()
                      if not line.startswith(" ") and " | " in line})
    keep = np.sort(np.random.default_rng(seed).choice(len(glosses), count, replace=False))
    return [glosses[i] for i in keep]


def cached_embeddings(model, texts, label=None):
    """Embeddings of texts by a model folder or packaged name, cached on disk by (model, texts)."""
    key = hashlib.sha256("\n".join([str(model), *texts]).encode()).hexdigest()[:16]
    file = CACHE / f"{label or Path(str(model)).name}-{len(texts)}-{key}.npy"
    if file.is_file():
        return np.load(file)
    X = Encoder(str(model)).embed(texts)
    file.parent.mkdir(parents=True, exist_ok=True)
    np.save(file, X)
    return X


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=2400)
    parser.add_argument("--rows", type=int, help="use only the first ROWS embedded texts (default: all)")
    parser.add_argument("--heldout", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2, help="torch, faiss and BLAS threads")
    parser.add_argument("--repeats", type=int, default=3, help="fits per method; the fastest is reported")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    set_threads(args.threads)
    threadpool_limits(args.threads)

    texts = wordnet_glosses(args.texts, args.seed)
    print(f"embedding {len(texts)} WordNet noun glosses with both models (cached)...", file=sys.stderr)
    X = cached_embeddings(DEFAULT_BASE_MODEL, texts, "base-minilm")
    Y = cached_embeddings(sre_model_path(), texts, "sre-embedding-model")
    X, Y = X[: args.rows], Y[: args.rows]
    holdout = args.heldout / len(X)
    _, held = holdout_split(len(X), holdout, args.seed)

    print(f"base MiniLM -> sre-embedding-model, d={X.shape[1]}, {len(X) - len(held)} texts to fit, "
          f"{len(held)} held out, {args.threads} threads")
    print(f"| map | held-out R^2 | held-out MSE | mean cosine | fit seconds |\n|---|---|---|---|---|")
    quality = fit_quality(X[held], Y[held])
    print(f"| identity (no map) | {quality['heldout_r2']:.3f} | {quality['heldout_mse']:.5f} "
          f"| {quality['heldout_cosine']:.3f} | - |")
    configs = [("lstsq, ridge by GCV (default)", ESMFitConfig())]
    configs += [(f"lstsq, ridge {r:g}", ESMFitConfig("lstsq", ridge=r)) for r in (1e-3, 1e-2, 1e-1, 1, 10)]
    configs += [(f"adamw, lr {lr:g}, 10 epochs, batch 32", ESMFitConfig("adamw", learning_rate=lr))
                for lr in (1e-3, 1e-2)]
    for name, config in configs:
        config.holdout, config.seed = holdout, args.seed
        fits = [ESM.fit(X, Y, config).config["fit"] for _ in range(args.repeats)]
        fit = fits[0]
        name += f" (chose {fit['ridge']:.3g})" if config.method == "lstsq" and config.ridge is None else ""
        print(f"| {name} | {fit['heldout_r2']:.3f} | {fit['heldout_mse']:.5f} | {fit['heldout_cosine']:.3f} "
              f"| {min(f['seconds'] for f in fits):.3f} |")


if __name__ == "__main__":
    main()
