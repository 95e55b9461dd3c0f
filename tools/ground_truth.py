"""Ground truth for source selection: how well does each source help each target, really?

For every (target, source, seed): take the model fine-tuned on the source (tools/finetune_sources.py),
fine-tune it further on a small seeded sample of the target's train split, and measure accuracy on the
target's test split; source "null" is the no-intermediate-task baseline (the base model itself).

    python tools/ground_truth.py data/tasks data/models data/eval/ground_truth.jsonl [--seeds 0 1 2]

Small targets are the point: transfer matters most when the target has 100-200 examples, and with
larger ones every source lands within the test set's noise. The seed picks the training sample, the
head's initialisation and the batch order; all sources share a seed's sample and the one test set, so
their differences are paired. Runs go source by source, so an interrupted run leaves whole sources done.
Resumable: one JSON line per run is appended and flushed; runs already in the file are skipped, and a
file made with other settings, or from another fine-tuning of a source, is refused. Sources run once
their model is done, including models finished while this runs; one still being fine-tuned when it ends
needs a rerun.
"""

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss  # noqa: F401  (faiss before torch)
import numpy as np

from esm_index.data import Task, read_task
from esm_index.embed import DEFAULT_BASE_MODEL, Encoder
from esm_index.errors import ESMIndexError
from esm_index.finetune import FinetuneConfig, finetune


@dataclass
class TargetSettings:
    """How each target is trained and tested; stored with every result line."""

    train_examples: int = 100
    test_examples: int = 1000
    epochs: float = 3.0
    learning_rate: float = 1e-4  # a new head gets only ~21 steps (BENCHMARKS.md, "Ground truth")
    batch_size: int = 16
    max_length: int = 64  # cost: BENCHMARKS.md, "Ground truth"
    base_model: str = DEFAULT_BASE_MODEL


def manifest_names(tasks, role):
    """Task names of one role ("source" or "target") in the manifest's order."""
    manifest = Path(tasks) / "manifest.json"
    if not manifest.is_file():
        raise ESMIndexError(f"{manifest}: missing (run tools/make_tasks.py first)")
    return [t["name"] for t in json.loads(manifest.read_text())["tasks"] if t["role"] == role]


def done_sources(tasks, models, only=None):
    """Sources (manifest order, or `only`'s) whose fine-tuned model is complete (has done.json)."""
    names = manifest_names(tasks, "source")
    unknown = sorted(set(only or ()) - set(names))
    if unknown:
        raise ESMIndexError(f"not sources in the manifest: {', '.join(unknown)}")
    return [n for n in (only or names) if (Path(models) / n / "done.json").is_file()]


def finetuned(models, name):
    """What tools/finetune_sources.py recorded for a source's model: examples, epochs, seed, seconds."""
    return json.loads((Path(models) / name / "done.json").read_text())


def target_train(tasks, name, settings, seed):
    """The seed's training sample of a target: what both the ground truth and every scoring method see."""
    return read_task(Path(tasks) / name / "train.csv", max_examples=settings.train_examples, seed=seed)


def target_test(tasks, name, settings):
    """A target's test set (a fixed sample), sorted by length so batches carry little padding."""
    test = read_task(Path(tasks) / name / "test.csv", max_examples=settings.test_examples, seed=0)
    order = np.argsort([len(t) for t in test.texts], kind="stable")
    return Task([test.texts[i] for i in order], test.labels[order])


def load_model(encoder, folder=None):
    """The encoder's base model, or a fine-tuned copy of it read from `folder` (with the base's pooling)."""
    encoder._load()
    if folder is None:
        return encoder.model_
    tuned = Encoder(str(folder), encoder.pooling_)
    tuned._load()
    return tuned.model_


def accuracy(encoder, model, head, train, test):
    """Share of test examples whose predicted class (by the head on pooled embeddings) is right."""
    import torch

    classes = np.unique(train.labels)  # the head's output order (finetune.label_targets)
    X = encoder.embed(test.texts, model=model)
    with torch.inference_mode():
        predicted = classes[head(torch.from_numpy(X)).argmax(1).numpy()]
    return float((predicted == test.labels).mean())


def model_facts(models, source):
    """How a source's model was made (its done.json less the time); None for the baseline."""
    if source is None:
        return None
    return {k: v for k, v in finetuned(models, source).items() if k != "seconds"}


def read_results(path, settings):
    """The rows already in the results file; refuse a file made with other settings."""
    rows = []
    if not Path(path).is_file():
        return rows
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if row["settings"] != asdict(settings):
            raise ESMIndexError(f"{path}:{number}: made with other settings {row['settings']}; use another file")
        rows.append(row)
    return rows


def check_models(rows, models, sources):
    """Refuse results made from another fine-tuning of a source than the model there now (a refit)."""
    current = {source: model_facts(models, source) for source in sources}
    for row in rows:
        if row["source"] in current and row.get("source_model") != current[row["source"]]:
            raise ESMIndexError(f"results for {row['source']} come from another model of it "
                                f"({row.get('source_model')}, now {current[row['source']]}); use another file")


def main():
    defaults = TargetSettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tasks", type=Path, help="folder written by tools/make_tasks.py")
    parser.add_argument("models", type=Path, help="folder written by tools/finetune_sources.py")
    parser.add_argument("results", type=Path, help="JSON-lines file to append results to")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--targets", nargs="+", help="only these targets (default: all in the manifest)")
    parser.add_argument("--sources", nargs="+", help="only these sources (default: all whose model is done)")
    for field, value in asdict(defaults).items():
        parser.add_argument("--" + field.replace("_", "-"), type=type(value), default=value)
    args = parser.parse_args()
    settings = TargetSettings(**{f: getattr(args, f) for f in asdict(defaults)})

    targets = args.targets or manifest_names(args.tasks, "target")
    unknown = sorted(set(targets) - set(manifest_names(args.tasks, "target")))
    if unknown:
        raise ESMIndexError(f"not targets in the manifest: {', '.join(unknown)}")
    rows = read_results(args.results, settings)
    done = {(row["target"], row["source"], row["seed"]) for row in rows}
    encoder = Encoder(settings.base_model, max_length=settings.max_length)
    tests = {t: target_test(args.tasks, t, settings) for t in targets}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "a") as results:
        while True:  # until a pass finds nothing to do, so models finished meanwhile are picked up
            sources = [None] + done_sources(args.tasks, args.models, args.sources)
            check_models(rows, args.models, sources)
            work = [(source, [(t, s) for t in targets for s in args.seeds if (t, source, s) not in done])
                    for source in sources]
            work = [(source, todo) for source, todo in work if todo]
            if not work:
                break
            for source, todo in work:
                model = load_model(encoder, None if source is None else args.models / source)
                facts = model_facts(args.models, source)
                for target, seed in todo:
                    row = {**run(encoder, model, settings, args.tasks, tests[target], target, source, seed),
                           "source_model": facts}
                    results.write(json.dumps(row) + "\n")
                    results.flush()
                    done.add((target, source, seed))
                    print(f"{target} <- {source or '(baseline)'} seed {seed}: accuracy {row['accuracy']:.4f}, "
                          f"{row['seconds']}s", file=sys.stderr, flush=True)


def run(encoder, model, settings, tasks, test, target, source, seed):
    """One ground-truth result: fine-tune `model` on the seed's target sample, test it."""
    started = time.perf_counter()
    train = target_train(tasks, target, settings, seed)
    config = FinetuneConfig(settings.epochs, settings.learning_rate, batch_size=settings.batch_size, seed=seed)
    tuned, head = finetune(encoder, train, config, model=model)
    return {
        "target": target, "source": source, "seed": seed,
        "accuracy": accuracy(encoder, tuned, head, train, test),
        "n_train": len(train), "n_test": len(test),
        "seconds": round(time.perf_counter() - started, 1), "settings": asdict(settings),
    }


if __name__ == "__main__":
    try:
        main()
    except ESMIndexError as e:
        sys.exit(f"error: {e}")
