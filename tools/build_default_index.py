"""Build the default index, indexes/default, from the fine-tuned source models, and describe it.

    python tools/build_default_index.py data/tasks data/models indexes/default

Adds every source whose model is done (tools/finetune_sources.py) with `--finetuned`: the ESM is fitted
from the base to that model's embeddings of the texts it was fine-tuned on (the same sample: the size and
seed its done.json records). Resumable: a source with unchanged content is skipped. Then it builds the
prefilter, compacts the LMDB file (a copy without free pages), and writes MANIFEST.md (sources and
rebuild commands) into the index folder and, beside it, <index>-target.csv: a small example target
(text,label) from a target task that is not a source, for
`esm-index query indexes/default indexes/default-target.csv`.
"""

import argparse
import csv
import json
import shutil
import sys
from collections import defaultdict
from pathlib import Path

import faiss  # noqa: F401  (faiss before torch)

from esm_index import ESMIndex
from esm_index.build import SourceSpec
from esm_index.data import read_task
from esm_index.embed import DEFAULT_BASE_MODEL
from esm_index.errors import ESMIndexError
from ground_truth import done_sources, finetuned, manifest_names  # tools/, beside this file


def add_sources(index, tasks, models):
    """Add (or skip, if unchanged) every source whose model is done; returns the names that failed."""
    specs = []
    for name in done_sources(tasks, models):
        tuned = finetuned(models, name)
        specs.append(SourceSpec(name, str(tasks / name / "train.csv"), finetuned=str(models / name),
                                max_examples=tuned["examples"], seed=tuned["seed"]))
    status = index.build(specs, progress=lambda status, name, result: print(f"{result} {name}", file=sys.stderr))
    for name, reason in status.failed.items():
        print(f"failed {name}: {reason}", file=sys.stderr)
    return list(status.failed)


def compact(folder):
    """Rewrite data.mdb without free pages (LMDB's compacting copy)."""
    import lmdb

    copy = folder / "compact.tmp"
    shutil.rmtree(copy, ignore_errors=True)
    copy.mkdir()
    env = lmdb.open(str(folder), readonly=True, lock=False, max_dbs=4)
    try:
        env.copy(str(copy), compact=True)
    finally:
        env.close()
    (copy / "data.mdb").replace(folder / "data.mdb")
    shutil.rmtree(copy)


def write_manifest(index, tasks, models, target):
    """MANIFEST.md: what each source is and how to rebuild the index from nothing."""
    facts = {t["name"]: t for t in json.loads((tasks / "manifest.json").read_text())["tasks"]}
    info = index.info()
    lines = [
        f"# {index.path.name}: {info['sources']} sources",
        "",
        f"Base model `{info['base_model']}` ({info['dim']}-d, {info['pooling']} pooling), ESMs stored as "
        f"{info['storage']}, {info['disk_bytes'] / 1e6:.1f} MB on disk. Each ESM maps base embeddings to those of "
        "the base model fine-tuned on the source (tools/finetune_sources.py), fitted by exact ridge least "
        "squares on the texts it was fine-tuned on. Texts come from packages installed on the machine; "
        "none are stored here.",
        "",
        "| source | corpus | description | classes | examples | ESM held-out R^2 |",
        "|---|---|---|---|---|---|",
    ]
    for source in sorted(index.sources(), key=lambda s: s["name"]):
        task = facts.get(source["name"], {})
        r2 = source.get("esm", {}).get("fit", {}).get("heldout_r2")
        lines.append(f"| {source['name']} | {task.get('corpus', '-')} | {task.get('description', '-')} | "
                     f"{source.get('num_classes', '-')} | {source.get('num_examples', '-')} | "
                     f"{'-' if r2 is None else f'{r2:.3f}'} |")
    base = "" if info["base_model"] == DEFAULT_BASE_MODEL else f" --base-model {info['base_model']}"
    groups = defaultdict(list)  # sources fine-tuned alike: one command each (a cap of `examples` redraws the sample)
    for name in sorted(index.store.names()):
        tuned = finetuned(models, name)
        groups[tuned["epochs"], tuned.get("learning_rate", 2e-5), tuned["examples"], tuned.get("max_length", 128),
               tuned["seed"]].append(name)
    lines += ["", "Rebuild (from the repository root, on a machine with the corpora of tools/make_tasks.py):", "",
              "```", f"python tools/make_tasks.py {tasks}"]
    lines += [f"python tools/finetune_sources.py {tasks} {models} --epochs {epochs:g} --learning-rate {rate:g} "
              f"--max-examples {examples} --max-length {length} --seed {seed}{base} --only {' '.join(names)}"
              for (epochs, rate, examples, length, seed), names in groups.items()]
    lines += [
        f"python tools/build_default_index.py {tasks} {models} {index.path} --target {target}{base} "
        f"--storage {info['storage']}",
        "```",
        "",
        f"Try it: `esm-index query {index.path} {target_file(index.path)}` (a sample of the target task "
        f"`{target}`, which is not a source).",
        "",
    ]
    (index.path / "MANIFEST.md").write_text("\n".join(lines))


def target_file(index_path):
    return index_path.parent / f"{index_path.name}-target.csv"


def write_target(tasks, name, path, rows):
    """A sample (seed 0) of a target's train split as text,label rows."""
    if name not in manifest_names(tasks, "target"):
        raise ESMIndexError(f"{name!r} is not a target task in {tasks / 'manifest.json'}")
    task = read_task(tasks / name / "train.csv", max_examples=rows)
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["text", "label"])
        writer.writerows(zip(task.texts, task.labels))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tasks", type=Path, help="folder written by tools/make_tasks.py")
    parser.add_argument("models", type=Path, help="folder written by tools/finetune_sources.py")
    parser.add_argument("index", type=Path, help="index folder to create or extend")
    parser.add_argument("--base-model", default=DEFAULT_BASE_MODEL, help="of a new index: the models' base")
    parser.add_argument("--storage", default="float32", help="for a new index: one of esm_index.esm.STORAGE_FORMS")
    parser.add_argument("--target", default="wordnet_noun_nature", help="target task for the example file")
    parser.add_argument("--target-rows", type=int, default=300)
    args = parser.parse_args()

    if (args.index / "data.mdb").is_file():
        index = ESMIndex.open(args.index)
    else:
        index = ESMIndex.create(args.index, args.base_model, storage=args.storage)
    with index:
        failed = add_sources(index, args.tasks, args.models)
        if not len(index):
            raise ESMIndexError(f"no fine-tuned source models in {args.models} yet")
        index.prefilter()  # built and saved with the store's generation
    compact(args.index)
    with ESMIndex.open(args.index, readonly=True) as index:
        write_manifest(index, args.tasks, args.models, args.target)
        print(f"{args.index}: {len(index)} sources, {index.info()['disk_bytes'] / 1e6:.1f} MB", file=sys.stderr)
    (args.index / "lock.mdb").unlink(missing_ok=True)  # run-time state, recreated on open: not for the repository
    write_target(args.tasks, args.target, target_file(args.index), args.target_rows)
    if failed:
        raise ESMIndexError(f"{len(failed)} sources failed: {', '.join(failed)}")


if __name__ == "__main__":
    try:
        main()
    except ESMIndexError as e:
        sys.exit(f"error: {e}")
