"""ESMs: exact and AdamW fitting, storage forms, hf-dataset-selector folders, import-esm / export-esm."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from esm_index import ESMIndex, ESMIndexError, rice
from esm_index.cli import app
from esm_index.data import read_task
from esm_index.esm import ESM, ESMFitConfig, check_storage, quantise_rows, rice_arrays
from esm_index.logme import TargetStats, logme_from_stats

runner = CliRunner()
COMPACT_FORMS = ["triangular-float16", "triangular-int10", "triangular-int9"]
INTEGER_FORMS = {"triangular-int10": 511, "triangular-int9": 255}  # each form's largest code


def cli(*args, ok=True):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert (result.exit_code == 0) == ok, result.output + result.stderr
    if not ok:
        assert result.stderr.strip().count("\n") == 0, result.stderr
    return result


def affine_data(n=400, d=16, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    W, b = rng.standard_normal((d, d)) / np.sqrt(d), rng.standard_normal(d)
    X = rng.standard_normal((n, d)) @ np.diag(np.linspace(0.2, 3, d))
    return X, X @ W.T + b + noise * rng.standard_normal((n, d)), W, b


def random_esm(d, seed, config=None):
    rng = np.random.default_rng(seed)
    return ESM(np.eye(d) + 0.3 * rng.standard_normal((d, d)), 0.1 * rng.standard_normal(d), config)


# -- fitting -------------------------------------------------------------------------------------
def test_lstsq_recovers_an_exact_affine_map_and_records_its_quality():
    X, Y, W, b = affine_data()
    esm = ESM.fit(X, Y, ESMFitConfig(ridge=1e-9))
    np.testing.assert_allclose(esm.weight, W, atol=1e-5)
    np.testing.assert_allclose(esm.bias, b, atol=1e-5)
    fit = esm.config["fit"]
    assert fit["method"] == "lstsq" and fit["num_examples"] == 400 and fit["heldout_examples"] == 40
    assert fit["heldout_r2"] == pytest.approx(1, abs=1e-9) and fit["heldout_cosine"] == pytest.approx(1, abs=1e-9)
    assert fit["heldout_mse"] < 1e-12 and fit["seconds"] >= 0


def test_lstsq_is_the_ridge_solution_with_an_unpenalised_bias():
    X, Y, _, _ = affine_data(n=60, noise=0.5, seed=1)
    ridge = 3.0
    esm = ESM.fit(X, Y, ESMFitConfig(ridge=ridge, holdout=0))
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)  # the normal equations, solved independently
    W = np.linalg.solve(Xc.T @ Xc + ridge * np.eye(X.shape[1]), Xc.T @ Yc).T
    np.testing.assert_allclose(esm.weight, W, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(esm.bias, Y.mean(0) - W @ X.mean(0), rtol=1e-5, atol=1e-5)
    assert "heldout_r2" not in esm.config["fit"]  # nothing held out


def test_default_ridge_is_chosen_by_cross_validation_and_beats_a_tiny_one_when_n_is_near_d():
    X, Y, _, _ = affine_data(n=60, d=40, noise=2.0, seed=5)
    chosen, tiny = ESM.fit(X, Y).config["fit"], ESM.fit(X, Y, ESMFitConfig(ridge=1e-6)).config["fit"]
    assert chosen["ridge"] > 1e-3 and chosen["heldout_r2"] > tiny["heldout_r2"] + 0.1
    X, Y, _, _ = affine_data(n=2000, d=8, noise=0.01, seed=6)  # plenty of data: almost no shrinkage
    chosen = ESM.fit(X, Y).config["fit"]
    assert chosen["heldout_r2"] > 0.999


def test_lstsq_is_stable_on_rank_deficient_embeddings():
    X, Y, _, _ = affine_data(n=200, d=16, seed=2)
    X[:, 8:] = X[:, :8] @ np.random.default_rng(3).standard_normal((8, 8))  # rank 8 of 16
    Y = X @ np.random.default_rng(4).standard_normal((16, 16)) + 1.0
    fit = ESM.fit(X, Y).config["fit"]
    assert fit["heldout_r2"] > 0.999


def test_adamw_is_seeded_and_approaches_the_exact_fit():
    X, Y, _, _ = affine_data(n=600, noise=0.1)
    config = ESMFitConfig("adamw", learning_rate=1e-2, epochs=20)
    first, again = ESM.fit(X, Y, config), ESM.fit(X, Y, config)
    np.testing.assert_array_equal(first.weight, again.weight)
    fit, exact = first.config["fit"], ESM.fit(X, Y).config["fit"]
    assert fit["method"] == "adamw" and fit["epochs"] == 20 and fit["learning_rate"] == 1e-2
    assert 0.9 < fit["heldout_r2"] <= exact["heldout_r2"] + 1e-3


@pytest.mark.parametrize("X, Y, config, message", [
    (np.ones((5, 3)), np.ones((5, 4)), None, "one shape"),
    (np.full((5, 3), np.nan), np.ones((5, 3)), None, "NaN"),
])
def test_fit_refuses_bad_input(X, Y, config, message):
    with pytest.raises(ESMIndexError, match=message):
        ESM.fit(X, Y, config)


def test_unknown_fit_method_refused_when_configured():
    """Before any fine-tuning that the fit would follow."""
    with pytest.raises(ESMIndexError, match="unknown ESM fit method 'sgd'"):
        ESMFitConfig("sgd")


# -- storage forms -------------------------------------------------------------------------------
def test_float32_round_trip_is_exact():
    esm = random_esm(32, 0)
    same = ESM.from_arrays(esm.to_arrays("float32"))
    np.testing.assert_array_equal(same.weight, esm.weight)
    np.testing.assert_array_equal(same.bias, esm.bias)


@pytest.mark.parametrize("form, share, tolerance",
                         [("triangular-float16", 0.27, 1e-4), ("triangular-int10", 0.18, 1e-3),
                          ("triangular-int9", 0.17, 1e-3)])
def test_triangular_forms_keep_esm_logme_in_a_fraction_of_the_bytes(form, share, tolerance):
    """R of [W, b] = Q R is the map rotated by Q^T: the same W~^T W~, so the same ESM-LogME for any target."""
    esm = random_esm(48, 2)
    arrays = esm.to_arrays(form)
    assert sum(a.nbytes for a in arrays.values()) < share * sum(a.nbytes for a in esm.to_arrays("float32").values())
    stored = ESM.from_arrays(arrays)
    assert np.allclose(np.tril(stored.weight, -1), 0) and not np.allclose(stored.weight, esm.weight)
    def gram(e):
        Wt = np.hstack([e.weight, e.bias[:, None]]).astype(np.float64)
        return Wt.T @ Wt

    np.testing.assert_allclose(gram(stored), gram(esm), atol=10 * tolerance * np.abs(gram(esm)).max())
    rng = np.random.default_rng(0)
    for n_classes in (2, 5):
        stats = TargetStats.from_embeddings(rng.standard_normal((80, 48)), rng.integers(0, n_classes, 80))
        exact, kept = (logme_from_stats([e.weight], [e.bias], stats)[0] for e in (esm, stored))
        assert kept == pytest.approx(exact, abs=tolerance)


@pytest.mark.parametrize("form, top", INTEGER_FORMS.items())
def test_integer_forms_keep_each_row_to_half_a_step(form, top):
    """Integer steps of each row's largest entry: every entry of R within half a step."""
    esm = random_esm(40, 3)
    R = np.linalg.qr(np.hstack([esm.weight, esm.bias[:, None]]).astype(np.float64), mode="r")
    arrays = esm.to_arrays(form)
    stored = ESM.from_arrays(arrays)
    error = np.abs(np.hstack([stored.weight, stored.bias[:, None]]) - R)
    assert np.all(error <= 0.5001 * arrays["esm.r_step"][:, None])
    np.testing.assert_allclose(arrays["esm.r_step"], np.abs(R).max(1) / top, rtol=1e-6)
    assert arrays["esm.r_rice"].dtype == np.uint8 and arrays["esm.r_rice_k"].shape == (40,)


@pytest.mark.parametrize("form, golden, decoded", [
    ("triangular-int10", {"esm.r_rice": "e25fb37fbff5a0", "esm.r_rice_k": "0809", "esm.r_step": "6f638f3b68be483b"},
     [[-2.236068, 0.2231692, -0.5601110], [0, 1.5652477, -0.5574855]]),
    ("triangular-int9", {"esm.r_rice": "e25f2dfdfeb4", "esm.r_rice_k": "0708", "esm.r_step": "68ab0f3c2c23c93b"},
     [[-2.236068, 0.2279912, -0.5612092], [0, 1.5652477, -0.5585786]])])
def test_integer_forms_keep_zero_rows_and_a_fixed_format(form, golden, decoded):
    """A map of one nonzero row: every row of R but the first is exactly zero, kept with step 1 and no
    error. The bytes of a 2-d record are pinned: indexes on disk must decode the same tomorrow. (Its
    columns' Rice offsets would not pay for their bytes, so it has none, as records written before they
    existed; tests/test_rice.py pins a stream with offsets.)"""
    stored = ESM.from_arrays({key: np.frombuffer(bytes.fromhex(value), np.float32 if key == "esm.r_step" else np.uint8)
                              for key, value in golden.items()})
    np.testing.assert_allclose(np.hstack([stored.weight, stored.bias[:, None]]), decoded, rtol=1e-6)
    esm = ESM(np.array([[2.0, 0.5], [-1.0, 1.5]]), np.array([0.25, -0.75]))
    assert {key: array.tobytes().hex() for key, array in esm.to_arrays(form).items()} == golden
    weight = np.zeros((6, 6))
    weight[0] = np.arange(1.0, 7.0)
    arrays = ESM(weight, np.eye(6)[0]).to_arrays(form)
    assert (arrays["esm.r_step"][1:] == 1).all()
    stored = ESM.from_arrays(arrays)
    assert np.abs(stored.weight[1:]).max() == 0 and np.abs(stored.bias[1:]).max() == 0


def test_column_offsets_shorten_the_record_where_columns_differ_in_scale():
    """Input dimensions the map weighs ten times more give larger entries down their whole columns: their own
    Rice offsets code them without lengthening every row's code."""
    esm = random_esm(64, 6)
    esm.weight[:, [50, 55, 60]] *= 10
    arrays = esm.to_arrays("triangular-int10")
    before = {key: array for key, array in arrays.items() if key != "esm.r_rice_c"}
    before["esm.r_rice"], before["esm.r_rice_k"], _ = rice.encode(
        rice.decode(arrays["esm.r_rice"], arrays["esm.r_rice_k"], np.arange(65, 1, -1),
                    np.nonzero(np.triu(np.ones((64, 65))))[1], arrays["esm.r_rice_c"]), np.arange(65, 1, -1))
    assert (arrays["esm.r_rice_c"][[50, 55, 60]] >= 2).all()
    assert arrays["esm.r_rice"].nbytes + arrays["esm.r_rice_c"].nbytes < 0.98 * before["esm.r_rice"].nbytes
    np.testing.assert_array_equal(ESM.from_arrays(arrays).weight, ESM.from_arrays(before).weight)


@pytest.mark.parametrize("form", INTEGER_FORMS)
def test_a_damaged_integer_record_is_refused(form):
    """The Rice stream has no checksum; a flipped bit in its unary part, or a changed parameter, shifts every
    later entry, and the rows then no longer reach their scale. (Two heavy input dimensions give the record
    column offsets.)"""
    esm = random_esm(16, 4)
    esm.weight[:, [12, 14]] *= 20
    arrays = esm.to_arrays(form)
    with pytest.raises(ESMIndexError, match="too short"):
        ESM.from_arrays({**arrays, "esm.r_rice": arrays["esm.r_rice"][:-40]})
    with pytest.raises(ESMIndexError, match=r"row steps of shape \(15,\) and parameters of shape \(16,\)"):
        ESM.from_arrays({**arrays, "esm.r_step": arrays["esm.r_step"][:-1]})
    for bit in (3, 50, 200):
        flipped = np.unpackbits(arrays["esm.r_rice"])
        flipped[bit] ^= 1
        with pytest.raises(ESMIndexError, match="damaged|too short"):
            ESM.from_arrays({**arrays, "esm.r_rice": np.packbits(flipped)})
    lowered = arrays["esm.r_rice_k"].copy()
    lowered[2] -= 1
    with pytest.raises(ESMIndexError, match="damaged|too short"):
        ESM.from_arrays({**arrays, "esm.r_rice_k": lowered})
    for column, offset in ((0, 1), (5, 3)):
        raised = arrays["esm.r_rice_c"].copy()
        raised[column] += offset
        with pytest.raises(ESMIndexError, match="damaged|too short"):
            ESM.from_arrays({**arrays, "esm.r_rice_c": raised})
    with pytest.raises(ESMIndexError, match=r"16 rows and column offsets of shape \(16,\)"):
        ESM.from_arrays({**arrays, "esm.r_rice_c": arrays["esm.r_rice_c"][:-1]})
    with pytest.raises(ESMIndexError, match="class offsets outside -8..8"):
        ESM.from_arrays({**arrays, "esm.r_rice_c": np.full(17, 9, np.int8)})


def test_an_integer_record_mixing_the_forms_scales_is_refused():
    """Each scale alone is a valid row, but one record is written in one form: rows of both are damage."""
    esm = random_esm(16, 5)
    R = np.linalg.qr(np.hstack([esm.weight, esm.bias[:, None]]), mode="r")
    (codes, steps), (codes9, steps9) = quantise_rows(R, 10), quantise_rows(R, 9)
    codes[3], steps[3] = codes9[3], steps9[3]
    with pytest.raises(ESMIndexError, match="damaged"):
        ESM.from_arrays(rice_arrays(codes, steps))


@pytest.mark.parametrize("form", ["float16", "lowrank:8", "triangular", "triangular-int8", None])
def test_bad_storage_forms_are_refused(form, tiny_model, tmp_path):
    with pytest.raises(ESMIndexError, match="unknown ESM storage form"):
        check_storage(form)
    with pytest.raises(ESMIndexError, match="unknown ESM storage form"):
        ESMIndex.create(tmp_path / "x", base_model=str(tiny_model), storage=form)
    assert not (tmp_path / "x" / "data.mdb").exists()


@pytest.mark.parametrize("form", COMPACT_FORMS)
def test_triangular_forms_keep_the_ranking_of_the_built_index(form, built_index, tasks, tmp_path):
    """Every source of the tiny index re-stored in a compact form: the same order, the same scores."""
    target = read_task(tasks["target"])
    with ESMIndex.open(built_index, readonly=True) as index:
        X = index.encoder.embed(target.texts)
        exact = {r.source: r.score for r in index.query_embeddings(X, target.labels, candidates=None)}
        esms = {r.name: ESM.from_arrays(r.arrays, r.info["esm"]) for r in index.store.records()}
        base_model = index.meta["base_model"]
    with ESMIndex.create(tmp_path / form, base_model, dim=32, storage=form) as compact:
        for name, esm in esms.items():
            compact.add_esm(name, esm)
        assert compact.info()["storage"] == form
        ranking = compact.query_embeddings(X, target.labels, candidates=None)
    assert [r.source for r in ranking] == sorted(exact, key=exact.get, reverse=True)
    np.testing.assert_allclose([r.score for r in ranking], [exact[r.source] for r in ranking], atol=1e-3)


INTEGER_KEYS = {"esm.r_rice", "esm.r_rice_k", "esm.r_rice_c", "esm.r_step"}


@pytest.mark.parametrize("form, keys", [("triangular-float16", {"esm.r"}), ("triangular-int10", INTEGER_KEYS),
                                         ("triangular-int9", INTEGER_KEYS)])
def test_sources_added_from_texts_are_stored_in_the_index_form(form, keys, tiny_model, tasks, tmp_path):
    with ESMIndex.create(tmp_path / "tri", base_model=str(tiny_model), storage=form) as index:
        index.add_source("af", tasks["animals-food"], finetuned=str(tiny_model))
        record = index.store.get("af")
        assert index.verify().ok
    assert {key for key in record.arrays if key.startswith("esm.")} == keys
    if form == "triangular-float16":
        assert record.arrays["esm.r"].dtype == np.float16 and record.arrays["esm.r"].shape == (32 * 35 // 2,)
    assert record.info["esm"]["fit"]["heldout_r2"] > 0.99  # the model is its own fine-tuned copy


@pytest.mark.parametrize("form", COMPACT_FORMS)
def test_convert_stores_every_source_again_in_another_form(form, built_index, tasks, tmp_path):
    """The copy keeps every source's statistics and facts, and the ranking as the form keeps it; the
    index converted from is only read. Converting back to float32 gives the stored (rotated) maps."""
    before = (built_index / "data.mdb").read_bytes()
    cli("convert", built_index, tmp_path / form, "--storage", form, "--quiet")
    assert (built_index / "data.mdb").read_bytes() == before
    assert (tmp_path / form / "prefilter.npz").exists()
    target = read_task(tasks["target"])
    with ESMIndex.open(built_index, readonly=True) as index, ESMIndex.open(tmp_path / form, readonly=True) as copy:
        shared = ("base_model", "dim", "pooling", "sources", "prefilter")
        assert {k: copy.info()[k] for k in shared} == {k: index.info()[k] for k in shared}
        assert copy.info()["storage"] == form
        for old, new in zip(index.store.records(), copy.store.records(), strict=True):
            assert new.name == old.name and "content_hash" in old.info and "content_hash" not in new.info
            assert {k: v for k, v in new.info.items() if k != "id"} == \
                {k: v for k, v in old.info.items() if k not in ("id", "content_hash")}
            stats = {k for k in old.arrays if k.startswith("stats.")}
            assert stats and set(new.arrays) == stats | set(ESM.from_arrays(old.arrays).to_arrays(form))
            for key in stats:
                np.testing.assert_array_equal(new.arrays[key], old.arrays[key])
        X = index.encoder.embed(target.texts)
        exact, kept = (i.query_embeddings(X, target.labels, candidates=None) for i in (index, copy))
    assert [r.source for r in kept] == [r.source for r in exact]
    np.testing.assert_allclose([r.score for r in kept], [r.score for r in exact], atol=1e-3)
    cli("convert", tmp_path / form, tmp_path / "back", "--storage", "float32", "--quiet")
    with ESMIndex.open(tmp_path / form, readonly=True) as copy, ESMIndex.open(tmp_path / "back", readonly=True) as back:
        for stored, restored in zip(copy.store.records(), back.store.records(), strict=True):
            np.testing.assert_array_equal(restored.arrays["esm.weight"], ESM.from_arrays(stored.arrays).weight)


def test_convert_refuses_an_existing_index_and_an_unknown_form(built_index, tmp_path):
    cli("convert", built_index, tmp_path / "copy", "--storage", "triangular-int10", "--quiet")
    before = (tmp_path / "copy" / "data.mdb").read_bytes()
    error = cli("convert", built_index, tmp_path / "copy", "--storage", "float32", ok=False).stderr
    assert "an index already exists here" in error
    assert (tmp_path / "copy" / "data.mdb").read_bytes() == before
    error = cli("convert", built_index, tmp_path / "other", "--storage", "int7", ok=False).stderr
    assert "unknown ESM storage form 'int7'" in error and not (tmp_path / "other").exists()


# -- hf-dataset-selector folders -----------------------------------------------------------------
HF_CONFIG = {
    "base_model_name": "org/base-32", "task_id": "glue", "task_subset": "mnli", "text_column": "premise,hypothesis",
    "label_column": "label", "task_split": "train", "num_examples": 1000, "seed": 42, "language": "en",
    "esm_architecture": "linear", "esm_embedding_dim": 32, "esm_num_epochs": 10, "esm_batch_size": 32,
    "esm_learning_rate": 0.001, "esm_weight_decay": 0.01, "esm_optimizer": "AdamW", "lm_num_epochs": 3,
    "lm_batch_size": 32, "lm_learning_rate": 2e-05, "lm_weight_decay": 0.01, "lm_optimizer": "AdamW",
    "version": "0.2.1",
}


def hf_folder(folder, esm, legacy=False, **config):
    """An ESM folder as hf-dataset-selector writes it (legacy: version 0.1.0, `sequential.0.*` keys)."""
    folder.mkdir(parents=True)
    prefix = "sequential.0." if legacy else "model."
    save_file({prefix + "weight": esm.weight, prefix + "bias": esm.bias}, str(folder / "model.safetensors"))
    config = {**HF_CONFIG, **({"version": "0.1.0"} if legacy else {}), **config}
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return folder


@pytest.mark.parametrize("legacy", [False, True])
def test_hf_folders_load_in_both_layouts(tmp_path, legacy):
    esm = random_esm(32, 3)
    loaded = ESM.load(hf_folder(tmp_path / "esm", esm, legacy))
    np.testing.assert_array_equal(loaded.weight, esm.weight)
    np.testing.assert_array_equal(loaded.bias, esm.bias)
    assert loaded.config["task_id"] == "glue" and loaded.config["lm_optimizer"] == "AdamW"


def test_save_writes_what_the_reference_loads(tmp_path):
    """The reference builds `nn.Linear(d, d)` from esm_architecture / esm_embedding_dim / version and loads
    `model.*` into it: do the same with torch, strictly."""
    import torch

    esm = random_esm(32, 4, {**HF_CONFIG, "version": "0.1.0"})
    esm.save(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["esm_architecture"] == "linear" and config["esm_embedding_dim"] == 32
    assert config["version"] != "0.1.0"  # the weights are under model.*, which a 0.1.0 config would not read
    layer = torch.nn.Linear(config["esm_embedding_dim"], config["esm_embedding_dim"])
    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    state = {k.removeprefix("model."): torch.from_numpy(v) for k, v in tensors.items()}
    layer.load_state_dict(state, strict=True)
    x = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    np.testing.assert_allclose(layer(torch.from_numpy(x)).detach().numpy(), esm.apply(x), rtol=1e-5, atol=1e-6)


def broken_folders(tmp_path):
    esm = random_esm(32, 5)
    cases = {
        "legacy keys, current version": (hf_folder(tmp_path / "a", esm, version="0.2.1"), "a/model.safetensors"),
        "wrong shape": (hf_folder(tmp_path / "b", ESM(np.eye(31), np.zeros(31))),
                        "b/config.json: esm_embedding_dim 32"),
        "non-square": (tmp_path / "c", "c/model.safetensors: ESM weight"),
        "extra key": (tmp_path / "d", "d/model.safetensors: keys"),
        "not json": (hf_folder(tmp_path / "e", esm), "e/config.json: not valid JSON"),
        "not safetensors": (hf_folder(tmp_path / "f", esm), "f/model.safetensors: not a safetensors file"),
        "missing weights": (tmp_path / "g", "g/model.safetensors: missing"),
        "other architecture": (hf_folder(tmp_path / "h", esm, esm_architecture="mlp"),
                               "h/config.json: esm_architecture"),
        "NaN weights": (hf_folder(tmp_path / "i", ESM(np.eye(32), np.zeros(32))), "i/model.safetensors: ESM weight"),
    }
    legacy_folder = tmp_path / "a"
    save_file({"sequential.0.weight": esm.weight, "sequential.0.bias": esm.bias},
              str(legacy_folder / "model.safetensors"))
    for name, arrays in (("c", {"model.weight": np.ones((32, 16), np.float32), "model.bias": np.zeros(32, np.float32)}),
                         ("d", {"model.weight": esm.weight, "model.bias": esm.bias, "extra": esm.bias})):
        hf_folder(tmp_path / name, esm)
        save_file(arrays, str(tmp_path / name / "model.safetensors"))
    (tmp_path / "e" / "config.json").write_text("{not json")
    (tmp_path / "f" / "model.safetensors").write_bytes(b"\x00" * 64)
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "config.json").write_text(json.dumps(HF_CONFIG))
    weights = esm.weight.copy()
    weights[0, 0] = np.nan
    save_file({"model.weight": weights, "model.bias": esm.bias}, str(tmp_path / "i" / "model.safetensors"))
    return cases


def test_broken_folders_are_refused_naming_the_file(tmp_path):
    for case, (folder, message) in broken_folders(tmp_path).items():
        with pytest.raises(ESMIndexError) as error:
            ESM.load(folder)
        assert message in str(error.value), case


# -- import-esm / export-esm ---------------------------------------------------------------------
@pytest.mark.parametrize("command", ["import-esm", "export-esm"])
def test_commands_have_help(command):
    assert "hf-dataset-selector" in cli(command, "--help").stdout


@pytest.fixture
def remote_index(tmp_path):
    """An index for a base model this machine does not have: `init --dim`."""
    path = tmp_path / "remote"
    cli("init", path, "--base-model", "org/base-32", "--dim", "32")
    return path


def sources(path):
    with ESMIndex.open(path, readonly=True) as index:
        return {s["name"]: s for s in index.sources()}, index.meta["generation"]


def test_import_names_sources_and_keeps_their_config(remote_index, tmp_path):
    folders = [
        hf_folder(tmp_path / "esm-mnli", random_esm(32, 0)),
        hf_folder(tmp_path / "esm-imdb", random_esm(32, 1), legacy=True, task_id="imdb", task_subset=None),
        hf_folder(tmp_path / "folder-named", random_esm(32, 2), task_id=None, task_subset=None),
    ]
    result = cli("import-esm", remote_index, *folders)
    assert "added source 'glue:mnli'" in result.stderr
    cli("import-esm", remote_index, folders[0], "--name", "mine")
    stored, _ = sources(remote_index)
    assert sorted(stored) == ["folder-named", "glue:mnli", "imdb", "mine"]
    assert stored["imdb"]["esm"]["version"] == "0.1.0" and stored["glue:mnli"]["esm"]["lm_num_epochs"] == 3
    assert stored["mine"]["num_examples"] == 1000 and stored["mine"]["imported_from"] == str(folders[0].resolve())
    assert "imdb" in cli("list", remote_index).stdout


@pytest.mark.parametrize("legacy", [False, True])
def test_import_export_round_trip_is_exact(remote_index, tmp_path, legacy):
    esm = random_esm(32, 7)
    cli("import-esm", remote_index, hf_folder(tmp_path / "in", esm, legacy), "--name", "x")
    cli("export-esm", remote_index, "x", tmp_path / "out")
    exported = ESM.load(tmp_path / "out")
    np.testing.assert_array_equal(exported.weight, esm.weight)
    np.testing.assert_array_equal(exported.bias, esm.bias)
    assert set(load_file(tmp_path / "out" / "model.safetensors")) == {"model.weight", "model.bias"}
    assert {k: v for k, v in exported.config.items() if k != "version"} == {
        k: v for k, v in HF_CONFIG.items() if k != "version"}
    cli("import-esm", remote_index, tmp_path / "out", "--name", "again")  # and back in
    assert "again" in sources(remote_index)[0]


def test_export_of_a_fitted_source_names_its_base_model_and_task(built_index, tmp_path):
    cli("export-esm", built_index, "all-four", tmp_path / "out")
    exported = ESM.load(tmp_path / "out")
    with ESMIndex.open(built_index, readonly=True) as index:
        stored = ESM.from_arrays(index.store.get("all-four").arrays)
        base_model = index.meta["base_model"]
    np.testing.assert_array_equal(exported.weight, stored.weight)
    assert exported.config["base_model_name"] == base_model and exported.config["task_id"] == "all-four"
    assert exported.config["fit"]["method"] == "lstsq" and exported.config["num_examples"] == 60
    assert "not an empty folder" in cli("export-esm", built_index, "all-four", tmp_path / "out", ok=False).stderr
    assert "no source named 'nope'" in cli("export-esm", built_index, "nope", tmp_path / "o2", ok=False).stderr


def test_imported_sources_are_ranked_and_prefiltered_without_texts(remote_index, tmp_path):
    """No texts, no model: query by embeddings; the prefilter vector comes from W alone."""
    folders = [hf_folder(tmp_path / f"e{i}", random_esm(32, 10 + i), task_id=f"t{i}", task_subset=None)
               for i in range(6)]
    cli("import-esm", remote_index, *folders)
    rng = np.random.default_rng(0)
    labels = np.repeat(["a", "b", "c"], 20)
    X = rng.standard_normal((60, 32)) + 2 * (labels[:, None] == "a") * rng.standard_normal(32)
    with ESMIndex.open(remote_index, readonly=True) as index:
        full = index.query_embeddings(X, labels, candidates=None)
        cut = index.query_embeddings(X, labels, candidates=3)
        stored = {r.name: r for r in index.store.records()}
    esms = [ESM.load(f) for f in folders]
    stats = TargetStats.from_embeddings(X, labels)
    expected = logme_from_stats([e.weight for e in esms], [e.bias for e in esms], stats)
    assert {r.source: r.score for r in full} == pytest.approx({f"t{i}": s for i, s in enumerate(expected)})
    assert cut.candidates == 3 and len(cut) == 3
    assert all(r.score == pytest.approx(dict((s.source, s.score) for s in full)[r.source]) for r in cut)
    assert all("stats.mapped_mean" not in r.arrays for r in stored.values())  # no texts, no statistics
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "y.npy", labels)
    by_cli = json.loads(cli("query", remote_index, "--embeddings", tmp_path / "X.npy", "--labels", tmp_path / "y.npy",
                            "--json", "--candidates", "all").stdout)
    assert [r["source"] for r in by_cli["results"]] == [r.source for r in full]
    task = tmp_path / "t.csv"
    task.write_text("text,label\ncat,a\ndog,b\n")
    assert "org/base-32" in cli("query", remote_index, task, ok=False).stderr  # no model to embed texts


def test_import_refusals_change_nothing(remote_index, tmp_path):
    good = hf_folder(tmp_path / "good", random_esm(32, 0))
    cases = {
        "other base model": ([hf_folder(tmp_path / "o", random_esm(32, 1), base_model_name="org/other")],
                             "o/config.json: an ESM for base model 'org/other'"),
        "other dimension": ([hf_folder(tmp_path / "s", random_esm(16, 1), esm_embedding_dim=16)],
                            "s/model.safetensors: a 16-d ESM; this index is 32-d"),
        "no base model": ([hf_folder(tmp_path / "n", random_esm(32, 1), base_model_name=None)], "--base-model"),
        "disagreeing base model": ([good, "--base-model", "org/else"], "is not the given 'org/else'"),
        "one bad of two": ([good, tmp_path / "missing"], "missing/config.json: missing"),
        "same name twice": ([good, good], "a second ESM named 'glue:mnli'"),
        "a name for two": ([good, good, "--name", "x"], "a name is for one imported ESM"),
        "bad name": ([hf_folder(tmp_path / "q", random_esm(32, 1), task_id="bad\nname")], "invalid source name"),
    }
    before = sources(remote_index)
    for case, (args, message) in cases.items():
        assert message in cli("import-esm", remote_index, *args, ok=False).stderr, case
    for case, (folder, message) in broken_folders(tmp_path / "broken").items():
        assert message in cli("import-esm", remote_index, good, folder, ok=False).stderr, case
    assert sources(remote_index) == before
    cli("import-esm", remote_index, hf_folder(tmp_path / "n2", random_esm(32, 1), base_model_name=None),
        "--base-model", "org/base-32", "--name", "vouched")
    assert "vouched" in sources(remote_index)[0]


@pytest.mark.parametrize("form", COMPACT_FORMS)
def test_import_and_export_through_a_triangular_index(form, tmp_path):
    path = tmp_path / "tri"
    cli("init", path, "--base-model", "org/base-32", "--dim", "32", "--storage", form)
    esm = random_esm(32, 9)
    cli("import-esm", path, hf_folder(tmp_path / "in", esm))
    assert json.loads(cli("info", path, "--json").stdout)["storage"] == form
    cli("export-esm", path, "glue:mnli", tmp_path / "out")  # the stored map: a rotation of the imported one
    exported = ESM.load(tmp_path / "out")
    np.testing.assert_array_equal(exported.weight, ESM.from_arrays(esm.to_arrays(form)).weight)
    assert np.allclose(np.tril(exported.weight, -1), 0)
