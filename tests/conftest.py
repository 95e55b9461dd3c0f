"""Shared fixtures: a tiny real BERT saved to disk, small labelled task files, a small built index."""

import csv
import importlib.util
import os
import sys
from pathlib import Path

import faiss  # noqa: F401  (faiss before torch: both bring OpenMP)
import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ESM_INDEX_THREADS", "2")

WORDS = {
    "animals": "cat dog horse cow sheep goat mouse bird fish wolf".split(),
    "food": "bread cheese apple pear soup rice bean cake milk salt".split(),
    "tools": "hammer saw drill nail screw wrench file chisel rope axe".split(),
    "weather": "rain snow wind storm cloud sun fog hail frost heat".split(),
}
FILLER = "the a of and to in is it that with".split()
TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load_tool(name):
    """Import tools/NAME.py as a module (tools/ is not a package), registered under NAME."""
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A 2-layer, 32-wide BertModel with a word-level vocabulary, saved as a transformers folder."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + FILLER + sorted(w for ws in WORDS.values() for w in ws)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    return folder


def write_task(path, classes, n=60, seed=0, noise=0.3):
    """A CSV task: each text mixes words of its class with filler and words of other classes."""
    rng = np.random.default_rng(seed)
    pool = sorted(w for ws in WORDS.values() for w in ws)
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["text", "label"])
        for i in range(n):
            label = classes[i % len(classes)]
            words = [rng.choice(WORDS[label]) if rng.random() > noise else rng.choice(pool) for _ in range(6)]
            words += list(rng.choice(FILLER, 3))
            rng.shuffle(words)
            writer.writerow([" ".join(words), label])
    return path


@pytest.fixture(scope="session")
def tasks(tmp_path_factory):
    """Five small source task files and one target, over overlapping class sets."""
    folder = tmp_path_factory.mktemp("tasks")
    specs = {
        "animals-food": ["animals", "food"],
        "tools-weather": ["tools", "weather"],
        "animals-tools": ["animals", "tools"],
        "food-weather": ["food", "weather"],
        "all-four": ["animals", "food", "tools", "weather"],
    }
    files = {name: write_task(folder / f"{name}.csv", classes, seed=i) for i, (name, classes) in enumerate(specs.items())}
    files["target"] = write_task(folder / "target.csv", ["animals", "weather"], n=40, seed=99)
    return files


@pytest.fixture(scope="session")
def built_index(tmp_path_factory, tiny_model, tasks):
    """An index over the tiny model with every source task added (fine-tuned for one epoch)."""
    from esm_index import ESMIndex
    from esm_index.finetune import FinetuneConfig

    path = tmp_path_factory.mktemp("indexes") / "tiny"
    with ESMIndex.create(path, base_model=str(tiny_model)) as index:
        for name, file in tasks.items():
            if name != "target":
                index.add_source(name, file, finetune=FinetuneConfig(epochs=1, learning_rate=1e-3))
    return path
