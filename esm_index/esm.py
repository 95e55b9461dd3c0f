"""Embedding Space Maps: the affine map f(x) = W x + b from base to fine-tuned embeddings.

Three concerns, top to bottom:
- fitting: the exact ridge least-squares map (default; its ridge term chosen by generalized
  cross-validation), or the paper's Linear(d, d) trained by AdamW; either way the held-out R^2, MSE
  and cosine of the fit are kept in the ESM's config;
- storage forms: how a store record encodes the map, chosen per index (STORAGE_FORMS);
  `to_arrays` / `from_arrays` are the only code that encodes or decodes a stored ESM;
- hf-dataset-selector interop: its folders (`config.json` + `model.safetensors`, keys `model.*`, or
  `sequential.0.*` in the legacy 0.1.0 layout), read strictly and written so its `ESM.from_pretrained`
  loads them.
"""

import json
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from . import rice
from .embed import import_torch
from .errors import ESMIndexError

FIT_METHODS = ("lstsq", "adamw")
RIDGE_GRID = np.logspace(-3, 0, 13)  # GCV's candidates, as fractions of the mean eigenvalue of Xc^T Xc


@dataclass
class ESMFitConfig:
    """How to fit an ESM. `lstsq` is the exact ridge solution, with `ridge` as given or (None) chosen by
    generalized cross-validation; `adamw` the paper's optimiser (MSE, 10 epochs, lr 1e-3)."""

    method: str = "lstsq"
    ridge: float | None = None
    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    holdout: float = 0.1
    seed: int = 0

    def __post_init__(self):  # checked here, before any fine-tuning the fit would follow
        if self.method not in FIT_METHODS:
            raise ESMIndexError(f"unknown ESM fit method {self.method!r} (choose from {', '.join(FIT_METHODS)})")


@dataclass
class ESM:
    """An affine map in float32, plus the JSON-able facts about where it came from."""

    weight: np.ndarray  # (d, d)
    bias: np.ndarray  # (d,)
    config: dict = field(default_factory=dict)

    def __post_init__(self):
        self.weight = np.ascontiguousarray(self.weight, dtype=np.float32)  # safetensors writes the raw buffer
        self.bias = np.ascontiguousarray(self.bias, dtype=np.float32)
        d = self.weight.shape[0] if self.weight.ndim == 2 else -1
        if self.weight.shape != (d, d) or self.bias.shape != (d,):
            raise ESMIndexError(f"ESM weight {self.weight.shape} and bias {self.bias.shape} are not (d, d) and (d,)")
        if not (np.isfinite(self.weight).all() and np.isfinite(self.bias).all()):
            raise ESMIndexError("ESM weight or bias contains NaN or infinity")

    @property
    def dim(self):
        return self.weight.shape[0]

    def apply(self, X):
        """Mapped embeddings f(X) = X W^T + b."""
        return np.asarray(X, dtype=np.float32) @ self.weight.T + self.bias

    # -- fitting ---------------------------------------------------------------------------------
    @classmethod
    def fit(cls, X, Y, config=None):
        """Fit X -> Y. The fit's quality is measured on a seeded held-out split, then the map is refitted
        on all rows; `config["fit"]` records both, and the seconds of the final fit."""
        config = config or ESMFitConfig()
        X, Y = np.asarray(X, np.float64), np.asarray(Y, np.float64)
        if X.shape != Y.shape or X.ndim != 2 or len(X) == 0:
            raise ESMIndexError(f"ESM fit needs two non-empty (n, d) arrays of one shape, got {X.shape} and {Y.shape}")
        if not (np.isfinite(X).all() and np.isfinite(Y).all()):
            raise ESMIndexError("ESM fit: embeddings contain NaN or infinity")
        solve = _fit_lstsq if config.method == "lstsq" else _fit_adamw
        train, held = holdout_split(len(X), config.holdout, config.seed)
        fit_info = {"method": config.method, "num_examples": len(X), "heldout_examples": len(held)}
        if config.method == "adamw":
            fit_info.update(epochs=config.epochs, batch_size=config.batch_size,
                            learning_rate=config.learning_rate, weight_decay=config.weight_decay)
        if len(held):
            W, b, _ = solve(X[train], Y[train], config)
            fit_info.update(fit_quality(X[held] @ W.T + b, Y[held]))
        start = time.perf_counter()
        W, b, facts = solve(X, Y, config)
        fit_info.update(facts, seconds=round(time.perf_counter() - start, 4))
        return cls(W, b, {"fit": fit_info})

    # -- storage forms ---------------------------------------------------------------------------
    def to_arrays(self, form="float32"):
        """The arrays a store record keeps for this ESM in one of STORAGE_FORMS."""
        if check_storage(form) == "float32":
            return {"esm.weight": self.weight, "esm.bias": self.bias}
        R = np.linalg.qr(np.hstack([self.weight, self.bias[:, None]]).astype(np.float64), mode="r")
        if form == "triangular-float16":
            return {"esm.r": R[_trapezoid(self.dim)].astype(np.float16)}
        return rice_arrays(*quantise_rows(R, INTEGER_BITS[form]))

    @classmethod
    def from_arrays(cls, arrays, config=None):
        """The ESM of a store record, in whichever form it was stored (told apart by its keys)."""
        if "esm.weight" in arrays:
            return cls(arrays["esm.weight"], arrays["esm.bias"], config or {})
        if "esm.r" in arrays:
            packed = arrays["esm.r"]
            dim = round((np.sqrt(8 * len(packed) + 9) - 3) / 2)  # the trapezoid holds dim (dim + 3) / 2 numbers
            R = np.zeros((dim, dim + 1), np.float32)
            R[_trapezoid(dim)] = packed
        elif "esm.r_rice" in arrays:
            R = _decode_rice(arrays)
        else:
            raise KeyError("esm.weight (or esm.r or esm.r_rice)")
        return cls(R[:, :-1], R[:, -1], config or {})

    # -- hf-dataset-selector folders -------------------------------------------------------------
    def save(self, folder, config=None):
        """Write `config.json` and `model.safetensors` in hf-dataset-selector's current layout.

        `config` (default: this ESM's) is completed with what the reference needs to rebuild the map:
        architecture, dimension and a non-legacy version (the weights are written under `model.*`)."""
        from safetensors.numpy import save_file

        config = {**(self.config if config is None else config), "esm_architecture": "linear",
                  "esm_embedding_dim": self.dim}
        if config.get("version") in (None, LEGACY_VERSION):
            config["version"] = HF_VERSION
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"model.weight": self.weight, "model.bias": self.bias}, str(folder / WEIGHTS_FILE))
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, folder):
        """Read a folder written by `save` or by hf-dataset-selector; anything that does not match the
        layout its config's version implies is refused, naming the file (no weights loaded half-way)."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        folder = Path(folder)
        weights_file, config_file = folder / WEIGHTS_FILE, folder / CONFIG_FILE
        for file in (config_file, weights_file):
            if not file.is_file():
                raise ESMIndexError(f"{file}: missing (an ESM folder holds {CONFIG_FILE} and {WEIGHTS_FILE})")
        try:
            config = json.loads(config_file.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ESMIndexError(f"{config_file}: not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise ESMIndexError(f"{config_file}: expected a JSON object")
        if config.get("esm_architecture", "linear") != "linear":
            raise ESMIndexError(f"{config_file}: esm_architecture {config['esm_architecture']!r} is not 'linear'")
        try:
            tensors = load_file(str(weights_file))
        except (SafetensorError, OSError, ValueError, TypeError) as e:
            raise ESMIndexError(f"{weights_file}: not a safetensors file of float arrays ({e})") from None
        prefix = "sequential.0." if config.get("version") == LEGACY_VERSION else "model."
        wanted = [prefix + "weight", prefix + "bias"]
        if set(tensors) != set(wanted):
            layout = "legacy 0.1.0" if prefix != "model." else "current"
            raise ESMIndexError(f"{weights_file}: keys {sorted(tensors)} do not match the {layout} layout {wanted}")
        try:
            esm = cls(tensors[wanted[0]], tensors[wanted[1]], config)
        except ESMIndexError as e:
            raise ESMIndexError(f"{weights_file}: {e}") from None
        if config.get("esm_embedding_dim", esm.dim) != esm.dim:
            raise ESMIndexError(f"{config_file}: esm_embedding_dim {config['esm_embedding_dim']} but the weights "
                                f"in {WEIGHTS_FILE} are {esm.dim}-d")
        return esm


# -- fitting helpers -----------------------------------------------------------------------------
def holdout_split(n, fraction, seed=0):
    """Seeded (train, held-out) row indices; nothing is held out below 20 rows."""
    order = np.random.default_rng(seed).permutation(n)
    n_held = int(n * fraction) if n >= 20 else 0
    return order[n_held:], order[:n_held]


def fit_quality(predicted, Y):
    """Held-out R^2 (against the per-dimension mean), mean squared error and mean cosine of a map's output."""
    predicted, Y = np.asarray(predicted, np.float64), np.asarray(Y, np.float64)
    residual = ((predicted - Y) ** 2).sum()
    total = ((Y - Y.mean(0)) ** 2).sum()
    cosine = (predicted * Y).sum(1) / (np.linalg.norm(predicted, axis=1) * np.linalg.norm(Y, axis=1) + 1e-12)
    return {
        "heldout_r2": float(1 - residual / max(total, 1e-300)),
        "heldout_mse": float(residual / Y.size),
        "heldout_cosine": float(cosine.mean()),
    }


def _fit_lstsq(X, Y, config):
    """Exact ridge solution on centred data (the bias is not penalised): W^T = (Xc^T Xc + ridge I)^-1 Xc^T Yc,
    solved through the symmetric eigendecomposition Xc^T Xc = V diag(e) V^T. Eigenvalues that rounding
    pushed below zero are clipped, so the system solved has condition <= (e_max + ridge) / ridge however
    rank-deficient the embeddings are. (An SVD of Xc avoids the Gram matrix but took 10-20x longer here.)"""
    mx, my = X.mean(0), Y.mean(0)
    Xc, Yc = X - mx, Y - my
    e, V = np.linalg.eigh(Xc.T @ Xc)
    e = np.maximum(e, 0)
    Z = V.T @ (Xc.T @ Yc)  # Xc^T Yc in the eigenbasis
    ridge = config.ridge if config.ridge is not None else _gcv_ridge(e, Z, (Yc**2).sum(), len(X))
    W = ((V / (e + ridge)) @ Z).T
    return W, my - W @ mx, {"ridge": float(ridge)}


def _gcv_ridge(e, Z, total, n):
    """The ridge term of RIDGE_GRID (times the mean eigenvalue, so it follows the embeddings' scale) with
    the least generalized cross-validation error n RSS / (n - 1 - df)^2, all from the eigendecomposition.
    A fixed small ridge overfits when n is near d (held-out R^2 below 0 at n = 500, d = 384 here)."""
    ridges = RIDGE_GRID[:, None] * (e.mean() or 1.0)
    shrink = e / (e + ridges)  # (grid, d): how much of each eigendirection the fit keeps
    rss = total - (shrink * (2 - shrink) * (Z**2).sum(1) / np.where(e > 0, e, 1)).sum(1)
    df = shrink.sum(1)
    gcv = np.where(n - 1 - df > 0, n * rss / np.maximum(n - 1 - df, 1e-12) ** 2, np.inf)
    return ridges[np.argmin(gcv), 0]


def _fit_adamw(X, Y, config):
    """The paper's way: a Linear(d, d) trained with MSE by AdamW in minibatches."""
    torch = import_torch()

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
    return layer.weight.detach().double().numpy(), layer.bias.detach().double().numpy(), {}


# -- storage forms -------------------------------------------------------------------------------
STORAGE_FORMS = ("float32", "triangular-float16", "triangular-int10", "triangular-int9")
"""How a record keeps W~ = [W, b]: exactly, in float32 (hf-dataset-selector's 2.36 MB at d = 768), or by the
triangular factor R of W~ = Q R (QR decomposition). R x~ = Q^T f(x) is the map rotated, and LogME sees
features only up to rotation (it depends on the ESM only through W~^T W~ = R^T R), so every target scores R as
it scores f, up to R's rounding; exporting it gives the rotated map. R is kept in float16 (a quarter of
float32), or as integer steps of each row's largest entry, Rice-coded: 10-bit steps (10.7-12.6% of float32 on
the pools measured) or 9-bit steps (9.3-11.1%; 9.4% at d = 768). Each was accepted on measured ranking
fidelity on real ESMs (tools/bench_compression.py; BENCHMARKS.md, "Four pools" and "triangular-int9"): on
every pool measured each keeps every target's top 5, and rho >= 0.99 on the pools of 20 sources or more (on 8
sources one swap of a near-tie below the top 5 is enough to drop it to 0.976). Rounding moves scores of
600-example targets by up to 2e-5 (float16), 2e-4 to 4e-4 (10-bit steps) and 3e-4 to 9e-4 (9-bit steps), so
sources that tie closer than that can swap under other rounding errors; the swaps measured cost at most 2e-4
in float32 scores, far below LogME's own sampling noise (2.6e-3 and more). Smaller forms were measured and not
offered: 8-bit steps (8.1% at d = 768) lose a top 5 on a 768-d pool of 38 sources, log residuals do no better
than 8-bit steps at their size, and a diagonal-plus-low-rank W reorders sources outright."""
INTEGER_BITS = {"triangular-int10": 10, "triangular-int9": 9}


def integer_scale(bits):
    """The largest code of `bits`-bit steps: the code of each row's largest entry."""
    return 2 ** (bits - 1) - 1


def quantise_rows(R, bits, offset=0.0):
    """Each row of R in integer steps of its largest entry / integer_scale(bits): (codes, float32 steps),
    R about (codes - offset) * steps. Rows below float32's range get step 1 and codes 0, so every row's
    largest code is 0 or the scale, which `_decode_rice` checks. `offset` (subtractive dither) lets a
    measurement draw fresh rounding errors."""
    top = integer_scale(bits)
    steps = (np.abs(R).max(1) / top).astype(np.float32)
    steps[steps < np.finfo(np.float32).tiny] = 1
    codes = np.clip(np.round(R / steps[:, None] + offset), -top, top)  # dither can push the largest out
    return codes.astype(np.int64), steps


def rice_arrays(codes, steps):
    """The record arrays of an integer form for the integer codes of R and their rows' steps: the codes of
    R's upper trapezoid Rice-coded, each row's Rice parameter, each column's offset to it where they pay
    for their bytes (a column is an input dimension, which the map may weigh more or less in every row),
    each row's step."""
    mask = _trapezoid(len(steps))
    stream, parameters, offsets = rice.encode(codes[mask], mask.sum(1), _trapezoid_columns(len(steps)))
    arrays = {"esm.r_rice": stream, "esm.r_rice_k": parameters, "esm.r_step": steps}
    return arrays if offsets is None else {**arrays, "esm.r_rice_c": offsets}


def _decode_rice(arrays):
    """R of an integer-form record, in float32. The Rice stream holds no checksum, but `quantise_rows`
    gives every row a largest code of 0 or its form's scale (511 or 255), one scale for all rows. Damage
    to the unary parts, the parameters or the offsets shifts every later entry and breaks this, so it is
    refused; a flipped low bit changes one entry, by under 2^k steps (k its Rice parameter), and is not
    seen. Records without column offsets (written before they existed, or where they would not pay) decode
    with every offset 0."""
    steps, parameters = arrays["esm.r_step"], arrays["esm.r_rice_k"]
    offsets = arrays.get("esm.r_rice_c")
    if steps.ndim != 1 or not len(steps) or parameters.shape != steps.shape:
        raise ESMIndexError(f"Rice-coded R with row steps of shape {steps.shape} and parameters of shape "
                            f"{parameters.shape}")
    if offsets is not None and offsets.shape != (len(steps) + 1,):
        raise ESMIndexError(f"Rice-coded R with {len(steps)} rows and column offsets of shape {offsets.shape}")
    mask = _trapezoid(len(steps))
    lengths = mask.sum(1)
    codes = rice.decode(arrays["esm.r_rice"], parameters, lengths, _trapezoid_columns(len(steps)), offsets)
    largest = np.maximum.reduceat(np.abs(codes), np.cumsum(lengths) - lengths)
    scales = set(np.unique(largest).tolist()) - {0}
    if len(scales) > 1 or not scales <= {integer_scale(bits) for bits in INTEGER_BITS.values()}:
        raise ESMIndexError("Rice-coded R is damaged: its rows' largest codes are not one form's scale")
    R = np.zeros(mask.shape, np.float32)
    R[mask] = codes
    return R * steps[:, None]


def check_storage(form):
    if form not in STORAGE_FORMS:
        raise ESMIndexError(f"unknown ESM storage form {form!r} (choose from {' | '.join(STORAGE_FORMS)})")
    return form


@lru_cache(maxsize=8)
def _trapezoid(dim):
    """The upper trapezoid of a (dim, dim + 1) matrix as a mask (dim (dim + 3) / 2 entries, row by row);
    kept, since every stored ESM an index decodes has its dimension."""
    mask = np.triu(np.ones((dim, dim + 1), bool))
    mask.flags.writeable = False
    return mask


@lru_cache(maxsize=8)
def _trapezoid_columns(dim):
    """The column of each entry of the upper trapezoid, in its order."""
    columns = np.nonzero(_trapezoid(dim))[1]
    columns.flags.writeable = False
    return columns


# -- hf-dataset-selector interop -----------------------------------------------------------------
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
LEGACY_VERSION = "0.1.0"  # hf-dataset-selector 0.1.0 kept the Linear layer as `sequential.0`
HF_VERSION = "0.2.1"  # the reference release whose layout `save` writes


def import_name(config, folder):
    """The source name of an imported ESM: its config's task id (with its subset), else its folder's name."""
    task, subset = config.get("task_id"), config.get("task_subset")
    if isinstance(task, str) and task.strip():
        return f"{task}:{subset}" if isinstance(subset, str) and subset.strip() else task
    return Path(folder).resolve().name


def check_origin(esm, folder, base_model, dim, assumed_base_model=None):
    """Refuse an imported ESM fitted for another base model or dimension than the index's.
    `assumed_base_model` stands in for a config that names none (and must agree with one that does)."""
    config_file, named = Path(folder) / CONFIG_FILE, esm.config.get("base_model_name")
    if named and assumed_base_model and named != assumed_base_model:
        raise ESMIndexError(f"{config_file}: base_model_name {named!r} is not the given {assumed_base_model!r}")
    named = named or assumed_base_model
    if not named:
        raise ESMIndexError(f"{config_file}: names no base_model_name; give the base model (--base-model)")
    if named != base_model:
        raise ESMIndexError(f"{config_file}: an ESM for base model {named!r}; this index's is {base_model!r}")
    if esm.dim != dim:
        raise ESMIndexError(f"{Path(folder) / WEIGHTS_FILE}: a {esm.dim}-d ESM; this index is {dim}-d")
