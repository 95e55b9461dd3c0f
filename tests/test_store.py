"""The LMDB store and `verify`: schema and layout, upsert/remove/rename in one transaction each, map
growth, and bad inputs that fail in one line and leave every stored byte as it was."""

import json
import subprocess
import sys

import lmdb
import numpy as np
import pytest
from typer.testing import CliRunner

from esm_index import ESMIndex, ESMIndexError
from esm_index.build import SourceSpec
from esm_index.cli import app
from esm_index.esm import ESM
from esm_index.prefilter import INDEX_FILE, Prefilter
from esm_index.store import DATABASES, SourceRecord

DIM = 16
runner = CliRunner()


def esm(seed, dim=DIM, **config):
    rng = np.random.default_rng(seed)
    return ESM(np.eye(dim) + 0.3 * rng.standard_normal((dim, dim)), rng.standard_normal(dim), config)


@pytest.fixture
def path(tmp_path):
    """A small index of five random ESMs, with its prefilter saved."""
    path = tmp_path / "index"
    with ESMIndex.create(path, base_model="base", dim=DIM) as index:
        for seed in range(5):
            index.add_esm(f"s{seed}", esm(seed))
        index.prefilter()
    return path


def snapshot(store):
    """Every byte the store holds, per database."""
    with store.begin() as txn:
        return {name: list(txn.cursor(db=store.dbs[name])) for name in DATABASES}


def raw_write(path, database, key, value=None):
    """Put (or, with value None, delete) one key behind the store's back."""
    env = lmdb.open(str(path), max_dbs=len(DATABASES), map_size=0)
    db = env.open_db(database.encode(), create=False)
    with env.begin(write=True) as txn:
        if value is None:
            txn.delete(key, db=db)
        else:
            txn.put(key, value, db=db)
    env.close()


def cli(*args, ok=True):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert (result.exit_code == 0) == ok, result.output + result.stderr
    if not ok:
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    return result


# -- layout and opening --------------------------------------------------------------------------
def test_unknown_schema_version_is_refused(path):
    raw_write(path, "meta", b"schema_version", b"99")
    with pytest.raises(ESMIndexError, match="unknown schema version 99"):
        ESMIndex.open(path)
    assert "unknown schema version 99" in cli("info", path, ok=False).stderr


def test_paths_that_are_not_indexes_are_refused_and_left_alone(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "data.mdb").write_bytes(b"not lmdb at all" * 100)
    env = lmdb.open(str(tmp_path / "plain"))
    with env.begin(write=True) as txn:
        txn.put(b"key", b"value")
    env.close()
    for name, message in [("empty", "not an esm-index index"), ("file", "not an esm-index index"),
                          ("garbage", "cannot open the store"), ("plain", "not an esm-index index")]:
        for readonly in (True, False):
            with pytest.raises(ESMIndexError, match=message):
                ESMIndex.open(tmp_path / name, readonly=readonly)
        assert message in cli("verify", tmp_path / name, ok=False).stderr
    env = lmdb.open(str(tmp_path / "plain"))
    with env.begin() as txn:
        assert list(txn.cursor()) == [(b"key", b"value")]  # no databases were created in it
    env.close()


def test_a_failed_create_leaves_no_index_behind(tmp_path):
    from esm_index.store import Store

    with pytest.raises(TypeError):
        Store.create(tmp_path / "new", {"base_model": "m", "dim": 4, "bad": object()})  # not JSON
    assert list((tmp_path / "new").iterdir()) == []
    Store.create(tmp_path / "new", {"base_model": "m", "dim": 4}).close()  # the folder is usable again


def test_readonly_index_refuses_every_write(path):
    with ESMIndex.open(path, readonly=True) as index:
        before = snapshot(index.store)
        for write in (lambda: index.add_esm("new", esm(9)), lambda: index.remove("s0"),
                      lambda: index.rename("s0", "t0"), lambda: index.store.set_meta(dim=3),
                      lambda: index.store.rebuild_ids()):
            with pytest.raises(ESMIndexError, match="opened read-only; cannot write"):
                write()
        assert snapshot(index.store) == before


# -- changes -------------------------------------------------------------------------------------
def test_each_change_is_one_transaction_with_a_new_generation(path):
    with ESMIndex.open(path) as index:
        generation, old_id = index.meta["generation"], index.store.get("s1").info["id"]
        assert index.add_esm("s1", esm(11)) == "replaced"
        replaced = index.store.get("s1")
        assert replaced.info["id"] > old_id and index.store.name_of(old_id) is None
        np.testing.assert_array_equal(replaced.arrays["esm.weight"], esm(11).weight)
        index.rename("s1", "renamed")
        assert index.store.get("renamed").info["id"] == replaced.info["id"]
        assert index.store.name_of(replaced.info["id"]) == "renamed" and "s1" not in index
        index.remove("renamed")
        assert index.store.name_of(replaced.info["id"]) is None
        assert index.add_esm("s5", esm(5)) == "added"
        assert index.meta["generation"] == generation + 4
        assert index.verify().ok


def test_failed_changes_leave_every_byte_unchanged(path):
    with ESMIndex.open(path) as index:
        before = snapshot(index.store)
        for change, message in [(lambda: index.remove("nope"), "no source named 'nope'"),
                                (lambda: index.rename("nope", "x"), "no source named 'nope'"),
                                (lambda: index.rename("s0", "s1"), "a source named 's1' already exists"),
                                (lambda: index.rename("s0", "bad\nname"), "invalid source name")]:
            with pytest.raises(ESMIndexError, match=message):
                change()
        assert snapshot(index.store) == before


def test_the_map_grows_on_demand(tmp_path, monkeypatch):
    monkeypatch.setattr("esm_index.store.MAP_SIZE", 1 << 16)
    with ESMIndex.create(tmp_path / "index", base_model="base", dim=64) as index:
        for seed in range(40):  # 40 x 17 KB: ten times the first map
            index.add_esm(f"s{seed}", esm(seed, dim=64))
        assert index.store.env.info()["map_size"] >= 1 << 20
        assert len(index) == 40 and index.verify().ok


GROW = """
import sys
from esm_index import ESMIndex
from esm_index.esm import ESM
import numpy as np
with ESMIndex.open(sys.argv[1]) as index:
    for seed in range(100, 130):
        index.add_esm(f"g{seed}", ESM(np.eye(64), np.zeros(64)))
    print(index.store.env.info()["map_size"])
"""


def test_a_writer_open_before_another_process_grows_the_map_keeps_working(tmp_path, monkeypatch):
    monkeypatch.setattr("esm_index.store.MAP_SIZE", 1 << 16)
    path = tmp_path / "index"
    ESMIndex.create(path, base_model="base", dim=64).close()
    with ESMIndex.open(path) as writer:
        small = writer.store.env.info()["map_size"]
        grown = int(subprocess.run([sys.executable, "-c", GROW, str(path)], capture_output=True, text=True,
                                   check=True).stdout)
        assert grown > small == writer.store.env.info()["map_size"]
        assert writer.add_esm("late", esm(1, dim=64)) == "added"  # adopts the grown map, then writes
        assert writer.store.env.info()["map_size"] >= grown
        assert len(writer) == 31 and writer.verify().ok


def test_a_threaded_writer_never_remaps_when_another_process_grows_the_file(tmp_path, monkeypatch):
    """serve --allow-writes: its threads read while it may write, and LMDB can remap only with no
    transaction open in the process, so the shared handle maps its whole address space up front."""
    monkeypatch.setattr("esm_index.store.MAP_SIZE", 1 << 16)
    path = tmp_path / "index"
    ESMIndex.create(path, base_model="base", dim=64).close()
    with ESMIndex.open(path, threaded=True) as shared:
        mapped = shared.store.env.info()["map_size"]
        with shared.store.begin() as held:  # a reader thread's snapshot stays open throughout
            subprocess.run([sys.executable, "-c", GROW, str(path)], capture_output=True, text=True, check=True)
            assert len(shared) == 30  # read beside the held snapshot: no MapResizedError, no remap
            assert held.stat(shared.store.dbs["sources"])["entries"] == 0
        assert shared.add_esm("late", esm(1, dim=64)) == "added"
        assert shared.store.env.info()["map_size"] == mapped and len(shared) == 31 and shared.verify().ok


def test_resumable_build_skips_sources_stored_from_the_same_content(tmp_path, tiny_model, tasks):
    source = tmp_path / "source.csv"
    source.write_bytes(tasks["animals-food"].read_bytes())
    spec = SourceSpec("af", str(source), finetuned=str(tiny_model))
    with ESMIndex.create(tmp_path / "index", base_model=str(tiny_model)) as index:
        assert index.add(spec, skip_unchanged=True) == "added"
        before = snapshot(index.store)
        assert index.add(spec, skip_unchanged=True) == "unchanged"
        assert snapshot(index.store) == before
        with open(source, "a") as file:
            file.write("cat dog horse,animals\n")
        assert index.add(spec, skip_unchanged=True) == "replaced"
        assert index.store.get("af").info["num_examples"] == 61
    raw_write(tmp_path / "index", "sources", b"af", b"damaged")
    with ESMIndex.open(tmp_path / "index") as index:
        assert index.add(spec, skip_unchanged=True) == "replaced"  # a damaged record is built again
        assert index.verify().ok and index.store.get("af").info["num_examples"] == 61


# -- bad inputs ----------------------------------------------------------------------------------
def bad_inputs(tmp_path):
    """name -> (a call that must fail, what its message says)."""
    X, y = np.random.default_rng(0).standard_normal((30, DIM)), np.arange(30) % 3
    nan_X, inf_X = X.copy(), X.copy()
    nan_X[3, 4], inf_X[5, 6] = np.nan, -np.inf
    files = {"empty.csv": b"", "latin1.csv": "text,label\ncaf\xe9,a\nth\xe9,b\n".encode("latin-1"),
             "misnamed.csv": b"sentence_text,topic\na b,x\nc d,y\n", "one-class.jsonl": b'{"text": "a", "label": 1}\n'
             b'{"text": "b", "label": 1}\n', "no-label.tsv": b"text\nhello\n"}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    return {
        "empty file": (lambda i: i.add_source("f", tmp_path / "empty.csv"), "empty file"),
        "non-UTF-8 file": (lambda i: i.add_source("f", tmp_path / "latin1.csv"), "not UTF-8"),
        "misnamed columns": (lambda i: i.add_source("f", tmp_path / "misnamed.csv"), "no text column found"),
        "misnamed column option": (lambda i: i.add_source("f", tmp_path / "misnamed.csv", text_column="text"),
                                   "no text column 'text'"),
        "missing label column": (lambda i: i.add_source("f", tmp_path / "no-label.tsv"), "no label column"),
        "one class": (lambda i: i.add_source("f", tmp_path / "one-class.jsonl"), "only one class"),
        "NaN target embeddings": (lambda i: i.query_embeddings(nan_X, y), "NaN"),
        "inf source embeddings": (lambda i: i.add_esm("f", esm(1), base_embeddings=inf_X), "NaN or infinity"),
        "label count": (lambda i: i.query_embeddings(X, y[:-1]), "29 labels for 30 embeddings"),
        "target dimension": (lambda i: i.query_embeddings(X[:, :8], y), "dimension 8, the index has 16"),
        "ESM dimension": (lambda i: i.add_esm("f", esm(1, dim=8)), "dimension 8, the index has 16"),
        "ESM of another base model": (lambda i: i.add_esm("f", esm(1, base_model_name="bert-base-uncased")),
                                      "for base model 'bert-base-uncased'"),
    }


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # statistics of inf embeddings
@pytest.mark.parametrize("case", [
    "empty file", "non-UTF-8 file", "misnamed columns", "misnamed column option", "missing label column",
    "one class", "NaN target embeddings", "inf source embeddings", "label count", "target dimension",
    "ESM dimension", "ESM of another base model"])
def test_bad_input_fails_in_one_line_and_changes_nothing(path, tmp_path, case):
    call, message = bad_inputs(tmp_path)[case]
    with ESMIndex.open(path) as index:
        before = snapshot(index.store)
        with pytest.raises(ESMIndexError, match=message) as error:
            call(index)
        assert "\n" not in str(error.value)
        assert snapshot(index.store) == before


def test_bad_files_through_the_cli_fail_in_one_line(path, tmp_path):
    bad_inputs(tmp_path)  # writes the files
    for name in ("empty.csv", "latin1.csv", "misnamed.csv", "one-class.jsonl", "no-label.tsv"):
        cli("add", path, tmp_path / name, "--name", "f", "--quiet", ok=False)
    np.save(tmp_path / "X.npy", np.full((4, DIM), np.inf))
    np.save(tmp_path / "y.npy", np.array([0, 1, 0, 1]))
    assert "NaN, inf" in cli("query", path, "--embeddings", tmp_path / "X.npy", "--labels", tmp_path / "y.npy",
                             ok=False).stderr
    assert json.loads(cli("verify", path, "--json").stdout)["ok"]


# -- corrupt records and verify ------------------------------------------------------------------
def test_a_corrupt_record_is_reported_and_can_be_removed(path):
    raw_write(path, "sources", b"s2", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with ESMIndex.open(path, readonly=True) as index:
        with pytest.raises(ESMIndexError, match="source 's2': corrupt record") as error:
            index.query_embeddings(*bad_target(), candidates=None)
        assert "\n" not in str(error.value)
    result = cli("verify", path, ok=False)
    assert "problem: source 's2': corrupt record" in result.stdout
    assert "1 problem(s)" in result.stderr
    cli("verify", path, "--repair", ok=False)  # repair never deletes a record: still wrong
    cli("rename", path, "s2", "damaged")
    cli("remove", path, "damaged")
    report = json.loads(cli("verify", path, "--json").stdout)
    assert report["ok"] and report["sources"] == 4
    with ESMIndex.open(path, readonly=True) as index:
        assert len(index.query_embeddings(*bad_target(), candidates=None)) == 4


def bad_target():
    rng = np.random.default_rng(1)
    return rng.standard_normal((20, DIM)), np.arange(20) % 2


def test_convert_between_compact_forms_keeps_maps_without_statistics(path, tmp_path):
    """Sources with no texts (ESMs alone) convert too, from one compact form to another, with the copy's
    progress reported source by source."""
    calls = []
    with ESMIndex.open(path, readonly=True) as index:
        index.convert(tmp_path / "int10", "triangular-int10").close()
    with ESMIndex.open(tmp_path / "int10", readonly=True) as index:
        with index.convert(tmp_path / "f16", "triangular-float16", lambda *done: calls.append(done)) as copy:
            assert copy.info()["storage"] == "triangular-float16" and copy.verify().ok
            records = {r.name: r for r in copy.store.records()}
            exact, kept = (i.query_embeddings(*bad_target(), candidates=None) for i in (index, copy))
        assert calls == [(i, 5) for i in range(1, 6)]
    assert sorted(records) == [f"s{seed}" for seed in range(5)]
    assert all(set(r.arrays) == {"esm.r"} for r in records.values())
    assert [r.source for r in kept] == [r.source for r in exact]
    np.testing.assert_allclose([r.score for r in kept], [r.score for r in exact], atol=1e-2)


@pytest.mark.parametrize("damage", ["corrupt record", "missing array", "damaged stream"])
def test_a_failed_conversion_leaves_no_index_behind(damage, path, tmp_path):
    """A damaged source stops `convert` halfway, naming the source; the half-made copy is removed (a
    folder that was there, empty, stays, empty), and the index converted from is as it was."""
    if damage == "corrupt record":
        raw_write(path, "sources", b"s2", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    elif damage == "missing array":
        raw_write(path, "sources", b"s2", SourceRecord("s2", {"esm.weight": esm(2).weight}).encode())
    else:
        arrays = esm(2).to_arrays("triangular-int10")
        arrays["esm.r_rice_k"][1] += 1
        raw_write(path, "sources", b"s2", SourceRecord("s2", arrays).encode())
    (tmp_path / "empty").mkdir()
    with ESMIndex.open(path, readonly=True) as index:
        before = snapshot(index.store)
        for out in (tmp_path / "copy", tmp_path / "empty"):
            with pytest.raises(ESMIndexError, match="^source 's2': ") as error:
                index.convert(out, "triangular-int10")
            assert "\n" not in str(error.value)
        assert snapshot(index.store) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "index"] and not any((tmp_path / "empty").iterdir())


def test_verify_finds_and_repairs_a_broken_ids_table_without_losing_records(path):
    with ESMIndex.open(path) as index:
        sources = snapshot(index.store)["sources"]
        lost_id = index.store.get("s3").info["id"]
    raw_write(path, "ids", lost_id.to_bytes(8, "big"))
    raw_write(path, "ids", (999).to_bytes(8, "big"), b"ghost")
    raw_write(path, "meta", b"next_id", b"2")
    report = json.loads(cli("verify", path, "--json", ok=False).stdout)
    assert not report["ok"] and any("ids table disagrees" in p for p in report["problems"])
    assert any("next_id 2" in p for p in report["problems"])
    repaired = json.loads(cli("verify", path, "--repair", "--json").stdout)
    assert repaired["ok"] and repaired["repaired"][0].startswith("rebuilt the ids table")
    with ESMIndex.open(path) as index:
        assert snapshot(index.store)["sources"] == sources  # every record byte for byte
        assert index.store.name_of(lost_id) == "s3" and index.store.name_of(999) is None
        assert index.add_esm("s5", esm(5)) == "added" and index.store.get("s5").info["id"] > 999


def test_verify_repairs_duplicate_ids(path):
    with ESMIndex.open(path) as index:
        record = index.store.get("s4")
        record.info["id"] = index.store.get("s0").info["id"]
        blob = record.encode()
    raw_write(path, "sources", b"s4", blob)
    with ESMIndex.open(path) as index:
        assert any("share id" in p for p in index.verify().problems)
        report = index.verify(repair=True)
        assert report.ok and "1 source(s) given a new id" in report.repaired[0]
        np.testing.assert_array_equal(index.store.get("s4").arrays["esm.weight"], esm(4).weight)


def test_verify_checks_the_saved_prefilter_against_the_store(path):
    with ESMIndex.open(path) as index:
        assert index.verify().to_dict() == {"ok": True, "path": str(path), "sources": 5, "generation": 5,
                                            "problems": [], "notes": [], "repaired": []}
        # a prefilter of another state, labelled with the current generation
        index.remove("s0")
        wrong = Prefilter.build(index.store)
        index.add_esm("s0", esm(7))
        wrong.generation = index.meta["generation"]
        wrong.save(path)
        assert any("differs from the store" in p for p in index.verify().problems)
        assert index.verify(repair=True).ok and index.verify().ok
        # a newer prefilter than the store (a store restored from a backup)
        wrong.generation = index.meta["generation"] + 3
        wrong.save(path)
        assert any("newer than the store" in p for p in index.verify().problems)
        assert index.verify(repair=True).ok
        # a stale, a truncated and a missing file, and a temporary file left by a kill: notes, repaired
        index.add_esm("s9", esm(9))
        assert "stale" in index.verify().notes[0] and index.verify().ok
        (path / INDEX_FILE).write_bytes((path / INDEX_FILE).read_bytes()[:100])
        (path / (INDEX_FILE + ".x1y2.tmp")).write_bytes(b"partial")
        report = index.verify()
        assert report.ok and len(report.notes) == 2 and "unreadable" in report.notes[1]
        report = index.verify(repair=True)
        assert report.ok and not report.notes and not list(path.glob("*.tmp"))
        (path / INDEX_FILE).unlink()
        assert "missing" in index.verify().notes[0]
        assert len(index.query_embeddings(*bad_target(), candidates=2)) == 2  # rebuilt and saved by the query
        assert index.verify().to_dict()["notes"] == []


def test_verify_flags_records_that_do_not_fit_the_index(path):
    with ESMIndex.open(path) as index:
        good = index.store.get("s1")
    cases = {
        b"wrong-shape": {**good.arrays, "stats.mapped_mean": np.zeros(DIM + 1, np.float32)},
        b"not-finite": {**good.arrays, "esm.bias": np.full(DIM, np.nan, np.float32)},
        b"no-weight": {k: v for k, v in good.arrays.items() if k != "esm.weight"},
        b"no-bias": {k: v for k, v in good.arrays.items() if k != "esm.bias"},
        b"other-dim": {**good.arrays, "esm.weight": np.eye(8, dtype=np.float32)},
    }
    for name, arrays in cases.items():
        raw_write(path, "sources", name, SourceRecord(name.decode(), arrays, good.info).encode())
    other = SourceRecord("other-model", good.arrays, {**good.info, "esm": {"base_model_name": "roberta-base"}})
    raw_write(path, "sources", b"other-model", other.encode())
    with ESMIndex.open(path, readonly=True) as index:
        problems = "\n".join(index.verify().problems)
    for expected in ["'wrong-shape': stats.mapped_mean has shape (17,)", "'not-finite': esm.bias contains NaN",
                     "'no-weight': missing array 'esm.weight (or esm.r or esm.r_rice)'", "'no-bias': missing array 'esm.bias'",
                     "'other-dim': the ESM's arrays do not form a map", "'other-model': the ESM is for base model "
                     "'roberta-base'"]:
        assert expected in problems
