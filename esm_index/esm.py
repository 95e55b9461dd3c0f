"""Embedding Space Maps: the affine map f(x) = W x + b from base to fine-tuned embeddings."""

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ESMIndexError

FIT_METHODS = ("lstsq", "adamw")


@dataclass
class ESMFitConfig:
    """How to fit an ESM. `lstsq` is the exact ridge solution; `adamw` the paper's optimiser (MSE, 10 epochs)."""

    method: str = "lstsq"
    ridge: float = 1e-2
    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    holdout: float = 0.1
    seed: int = 0


@dataclass
class ESM:
    """An affine map in float32, plus the JSON-able facts about where it came from."""

    weight: np.ndarray  # (d, d)
    bias: np.ndarray  # (d,)
    config: dict = field(default_factory=dict)

    def __post_init__(self):
        self.weight = np.asarray(self.weight, dtype=np.float32)
        self.bias = np.asarray(self.bias, dtype=np.float32)
        d = self.weight.shape[0] if self.weight.ndim == 2 else -1
        if self.weight.shape != (d, d) or self.bias.shape != (d,):
            raise ESMIndexError(f"ESM weight {self.weight.shape} and bias {self.bias.shape} are not (d, d) and (d,)")

    @property
    def dim(self):
        return self.weight.shape[0]

    def apply(self, X):
        """Mapped embeddings f(X) = X W^T + b."""
        return np.asarray(X, dtype=np.float32) @ self.weight.T + self.bias

    @classmethod
    def fit(cls, X, Y, config=None):
        """Fit X -> Y; records held-out R^2 and MSE (on a seeded split) and then refits on all rows."""
        config = config or ESMFitConfig()
        if config.method not in FIT_METHODS:
            raise ESMIndexError(f"unknown ESM fit method {config.method!r} (choose from {', '.join(FIT_METHODS)})")
        X, Y = np.asarray(X, np.float64), np.asarray(Y, np.float64)
        if X.shape != Y.shape or X.ndim != 2:
            raise ESMIndexError(f"ESM fit needs two (n, d) arrays of one shape, got {X.shape} and {Y.shape}")
        solve = _fit_lstsq if config.method == "lstsq" else _fit_adamw
        order = np.random.default_rng(config.seed).permutation(len(X))
        n_held = int(len(X) * config.holdout) if len(X) >= 20 else 0
        held, train = order[:n_held], order[n_held:]
        start = time.perf_counter()
        fit_info = {"method": config.method, "num_examples": len(X)}
        if n_held:
            W, b = solve(X[train], Y[train], config)
            fit_info.update(_fit_quality(X[held] @ W.T + b, Y[held]))
        W, b = solve(X, Y, config)
        fit_info["seconds"] = round(time.perf_counter() - start, 4)
        return cls(W, b, {"fit": fit_info})

    def to_arrays(self, dtype="float32"):
        """The arrays a store record keeps for this ESM, in the index's storage precision."""
        return {"esm.weight": self.weight.astype(dtype), "esm.bias": self.bias.astype(dtype)}

    @classmethod
    def from_arrays(cls, arrays, config=None):
        return cls(arrays["esm.weight"], arrays["esm.bias"], config or {})

    def save(self, folder):
        """Write `config.json` and `model.safetensors` in hf-dataset-selector's layout."""
        from safetensors.numpy import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"model.weight": self.weight, "model.bias": self.bias}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, folder):
        """Read a folder written by `save` or by hf-dataset-selector (current or legacy 0.1.0 keys)."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        folder = Path(folder)
        weights_file, config_file = folder / "model.safetensors", folder / "config.json"
        for file in (weights_file, config_file):
            if not file.is_file():
                raise ESMIndexError(f"{file}: missing (an ESM folder holds config.json and model.safetensors)")
        try:
            config = json.loads(config_file.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ESMIndexError(f"{config_file}: not valid JSON ({e})") from None
        try:
            tensors = load_file(str(weights_file))
        except (SafetensorError, OSError, ValueError) as e:
            raise ESMIndexError(f"{weights_file}: not a safetensors file ({e})") from None
        for prefix in ("model.", "sequential.0."):
            if set(tensors) == {prefix + "weight", prefix + "bias"}:
                try:
                    return cls(tensors[prefix + "weight"], tensors[prefix + "bias"], config)
                except ESMIndexError as e:
                    raise ESMIndexError(f"{weights_file}: {e}") from None
        raise ESMIndexError(f"{weights_file}: unexpected keys {sorted(tensors)} (want model.weight/model.bias)")


def _fit_quality(predicted, Y):
    residual = ((predicted - Y) ** 2).sum()
    total = ((Y - Y.mean(0)) ** 2).sum()
    cosine = (predicted * Y).sum(1) / (np.linalg.norm(predicted, axis=1) * np.linalg.norm(Y, axis=1) + 1e-12)
    return {
        "heldout_r2": float(1 - residual / max(total, 1e-300)),
        "heldout_mse": float(residual / Y.size),
        "heldout_cosine": float(cosine.mean()),
    }


def _fit_lstsq(X, Y, config):
    """Exact ridge solution on centred data (the bias is not penalised), by a symmetric solve in float64."""
    mx, my = X.mean(0), Y.mean(0)
    Xc, Yc = X - mx, Y - my
    gram = Xc.T @ Xc + config.ridge * np.eye(X.shape[1])
    W = np.linalg.solve(gram, Xc.T @ Yc).T
    return W, my - W @ mx


def _fit_adamw(X, Y, config):
    """The paper's way: a Linear(d, d) trained with MSE by AdamW in minibatches."""
    import torch

    torch.manual_seed(config.seed)
    layer = torch.nn.Linear(X.shape[1], Y.shape[1])
    optimizer = torch.optim.AdamW(layer.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    Xt, Yt = torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(Y, dtype=torch.float32)
    generator = torch.Generator().manual_seed(config.seed)
    for _ in range(config.epochs):
        for batch in torch.randperm(len(Xt), generator=generator).split(config.batch_size):
            loss = torch.nn.functional.mse_loss(layer(Xt[batch]), Yt[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return layer.weight.detach().double().numpy(), layer.bias.detach().double().numpy()
