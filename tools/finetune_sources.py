"""Fine-tune the base model once on every source task and save each model: the shared first step of the
default index (ESMs fitted to these models) and of the ground truth (targets fine-tuned from them).

    python tools/finetune_sources.py data/tasks data/models [--epochs 1] [--learning-rate 2e-5] [--max-examples 250] [--max-length 64]

Resumable: a source whose folder holds `done.json` is skipped. Runs in the background; prints one line
per source to stderr.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import faiss  # noqa: F401  (faiss before torch)

from esm_index.data import read_task
from esm_index.embed import DEFAULT_BASE_MODEL, Encoder
from esm_index.finetune import FinetuneConfig, finetune


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tasks", type=Path, help="folder written by tools/make_tasks.py")
    parser.add_argument("models", type=Path, help="where to save one fine-tuned model per source")
    parser.add_argument("--base-model", default=DEFAULT_BASE_MODEL)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--learning-rate", type=float, default=FinetuneConfig.learning_rate)
    parser.add_argument("--max-examples", type=int, default=250)
    parser.add_argument("--max-length", type=int, default=64, help="tokens per text while fine-tuning")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", help="only these sources")
    args = parser.parse_args()

    manifest = json.loads((args.tasks / "manifest.json").read_text())
    sources = [t["name"] for t in manifest["tasks"] if t["role"] == "source"]
    encoder = Encoder(args.base_model, max_length=args.max_length)
    config = FinetuneConfig(epochs=args.epochs, learning_rate=args.learning_rate, seed=args.seed)
    for name in args.only or sources:
        folder = args.models / name
        if (folder / "done.json").is_file():
            continue
        started = time.perf_counter()
        task = read_task(args.tasks / name / "train.csv", max_examples=args.max_examples, seed=args.seed)
        model, _ = finetune(encoder, task, config)
        model.save_pretrained(folder)
        encoder.tokenizer_.save_pretrained(folder)
        seconds = time.perf_counter() - started
        settings = {"examples": len(task), "epochs": args.epochs, "learning_rate": args.learning_rate, "max_length": args.max_length, "seed": args.seed,
                    "seconds": round(seconds, 1)}
        (folder / "done.json").write_text(json.dumps(settings) + "\n")
        print(f"{name}: {len(task)} examples, {seconds:.0f}s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
