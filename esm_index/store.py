"""The LMDB store: the source of truth. One record per source, one write transaction per change.

Layout (named sub-databases of one LMDB environment in the index folder):
- `meta`: JSON values: schema version, base model, dimension, generation, next source id, settings;
- `sources`: source name -> record (a safetensors blob: arrays plus a JSON `info` in its metadata);
- `ids`: source id (8 bytes, big-endian) -> source name, so derived indexes can refer to sources by number.
Every write bumps `generation`, so derived data (the FAISS prefilter) knows when it is stale. Ids are
never reused: a replaced source gets a new one, so a stale derived index never points at the wrong data.

Many processes may read while one writes: each read runs in one LMDB snapshot, so it sees the state
before or after a change, never half of one; a killed writer's transaction simply never happened.
The map starts at MAP_SIZE and a writer doubles it when full; readers map READ_MAP_SIZE of address
space (no disk), so a writer growing the file never invalidates their mapping. A writable handle shared
by threads (`threaded`, as in `serve --allow-writes`) maps READ_MAP_SIZE too: LMDB may remap only while
the process has no transaction open, which threads reading beside it cannot promise.
"""

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import lmdb
import numpy as np

from .errors import ESMIndexError

SCHEMA_VERSION = 1
DATABASES = ("meta", "sources", "ids")
MAP_SIZE = 1 << 30  # a new store's map; it doubles on demand
READ_MAP_SIZE = 1 << 40  # address space only: the file grows by what is written


@dataclass
class SourceRecord:
    """Everything stored for one source: its ESM, vectors derived from it, and facts as JSON."""

    name: str
    arrays: dict  # name -> np.ndarray: the ESM ("esm.*", by storage form), summary statistics
    info: dict = field(default_factory=dict)  # id, content hash, task and fit facts, ESM config

    def encode(self):
        from safetensors.numpy import save

        arrays = {k: np.ascontiguousarray(v) for k, v in self.arrays.items()}
        return save(arrays, metadata={"info": json.dumps(self.info, sort_keys=True)})

    @classmethod
    def decode(cls, name, blob, keys=None):
        """Parse a record, or only the arrays named in `keys`; a damaged one raises ESMIndexError."""
        try:
            (header_len,) = struct.unpack("<Q", bytes(blob[:8]))
            header = json.loads(bytes(blob[8 : 8 + header_len]))
            info = json.loads(header.pop("__metadata__", {}).get("info", "{}"))
            if not isinstance(info, dict):
                raise ValueError("info is not a JSON object")
            data = memoryview(blob)[8 + header_len :]
            arrays = {}
            for key in header if keys is None else keys:
                spec = header[key]
                start, end = spec["data_offsets"]
                dtype = np.dtype(_DTYPES[spec["dtype"]])
                arrays[key] = np.frombuffer(data[start:end], dtype=dtype).reshape(spec["shape"]).copy()
        except Exception as e:  # any parse failure means the same thing: the record is corrupt
            raise ESMIndexError(f"source {name!r}: corrupt record ({type(e).__name__}: {e}); "
                                "see `esm-index verify`") from None
        return cls(name, arrays, info)


_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I8": "i1", "U8": "u1"}


def check_new_folder(path):
    """`path`, if a new index may be made there: a missing or empty folder."""
    path = Path(path)
    if (path / "data.mdb").exists():
        raise ESMIndexError(f"{path}: an index already exists here")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ESMIndexError(f"{path}: exists and is not an empty folder")
    return path


def _id_key(source_id):
    return struct.pack(">Q", source_id)


class Store:
    """An LMDB environment holding one index. Open one per process; never share it across fork()."""

    def __init__(self, path, readonly=True, threaded=False):
        self.path = Path(path)
        self.readonly = readonly
        self.threaded = threaded
        if not (self.path / "data.mdb").is_file():
            raise ESMIndexError(f"{self.path}: not an esm-index index (no data.mdb)")
        self._open(create=False)
        try:
            meta = self.meta()
            if "schema_version" not in meta:
                raise ESMIndexError(f"{self.path}: not an esm-index index (no schema version)")
            if meta["schema_version"] != SCHEMA_VERSION:
                raise ESMIndexError(f"{self.path}: unknown schema version {meta['schema_version']!r} "
                                    f"(this esm-index reads version {SCHEMA_VERSION})")
        except ESMIndexError:
            self.close()
            raise
        if not readonly:
            self.env.reader_check()  # free reader slots left by killed processes

    def _open(self, create, map_size=0):
        """Open the environment and its named databases (map_size 0: the size the store was left at)."""
        try:
            self.env = lmdb.open(
                str(self.path), map_size=READ_MAP_SIZE if self.readonly or self.threaded else map_size,
                max_dbs=len(DATABASES),
                readonly=self.readonly, create=create, subdir=True, lock=True, max_readers=256,
            )
        except lmdb.Error as e:
            raise ESMIndexError(f"{self.path}: cannot open the store ({e})") from None
        try:
            self.dbs = {name: self.env.open_db(name.encode(), create=create) for name in DATABASES}
        except lmdb.Error:  # an LMDB environment, but not ours
            self.close()
            raise ESMIndexError(f"{self.path}: not an esm-index index (no {', '.join(DATABASES)} databases)") from None

    @classmethod
    def create(cls, path, meta, map_size=None):
        """A new, empty store with the given metadata (base model, dimension, settings)."""
        path = check_new_folder(path)
        path.mkdir(parents=True, exist_ok=True)
        store = cls.__new__(cls)
        store.path, store.readonly, store.threaded = path, False, False
        store._open(create=True, map_size=map_size or MAP_SIZE)
        try:
            with store.begin(write=True) as txn:
                for key, value in {**meta, "schema_version": SCHEMA_VERSION, "generation": 0, "next_id": 0}.items():
                    store._put_meta(txn, key, value)
        except BaseException:  # e.g. metadata that is not JSON: leave no half-made index behind
            store.close()
            for name in ("data.mdb", "lock.mdb"):
                (path / name).unlink(missing_ok=True)
            raise
        return store

    def close(self):
        self.env.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def begin(self, write=False):
        """A transaction. When another process has grown the map past ours, adopt its size and retry."""
        try:
            return self.env.begin(write=write)
        except lmdb.MapResizedError:
            self.env.set_mapsize(0)
            return self.env.begin(write=write)

    # -- reading ---------------------------------------------------------------------------------
    def meta(self, txn=None):
        with self._read(txn) as txn:
            meta = {}
            for key, value in txn.cursor(db=self.dbs["meta"]):
                try:
                    meta[key.decode()] = json.loads(value)
                except ValueError:
                    key = key.decode(errors="replace")
                    raise ESMIndexError(f"{self.path}: corrupt metadata under {key!r}") from None
            return meta

    @property
    def generation(self):
        return self.meta()["generation"]

    def _read(self, txn):
        """Use the caller's transaction, or a fresh read-only one (one snapshot: never a torn view)."""
        if txn is not None:
            return _Borrowed(txn)
        return self.begin()

    def names(self, txn=None):
        with self._read(txn) as txn:
            return [k.decode() for k in txn.cursor(db=self.dbs["sources"]).iternext(values=False)]

    def __len__(self):
        with self.begin() as txn:
            return txn.stat(self.dbs["sources"])["entries"]

    def __contains__(self, name):
        with self.begin() as txn:
            return txn.get(name.encode(), db=self.dbs["sources"]) is not None

    def get(self, name, txn=None, keys=None):
        """The record of a source (only the arrays in `keys`, if given)."""
        with self._read(txn) as txn:
            blob = txn.get(name.encode(), db=self.dbs["sources"])
            if blob is None:
                raise ESMIndexError(f"no source named {name!r} in {self.path}")
            return SourceRecord.decode(name, blob, keys)

    def records(self, names=None, txn=None, keys=None):
        """Yield records (all, or the named ones) from one snapshot."""
        with self._read(txn) as txn:
            for name in self.names(txn) if names is None else names:
                yield self.get(name, txn, keys)

    def name_of(self, source_id, txn=None):
        with self._read(txn) as txn:
            value = txn.get(_id_key(int(source_id)), db=self.dbs["ids"])
            return None if value is None else value.decode()

    def id_table(self, txn=None):
        """The `ids` database as {source id: name}."""
        with self._read(txn) as txn:
            return {struct.unpack(">Q", k)[0]: v.decode() for k, v in txn.cursor(db=self.dbs["ids"])}

    # -- writing: each method is one transaction -----------------------------------------------
    def _write(self, change):
        """Run change(txn) in one write transaction that also bumps the generation; grow the map if full."""
        if self.readonly:
            raise ESMIndexError(f"{self.path}: opened read-only; cannot write")
        while True:
            try:
                with self.begin(write=True) as txn:
                    result = change(txn)
                    self._put_meta(txn, "generation", self.meta(txn)["generation"] + 1)
                    return result
            except lmdb.MapFullError:  # the transaction was aborted: grow and run it again
                self.env.set_mapsize(self.env.info()["map_size"] * 2)
            except lmdb.Error as e:
                raise ESMIndexError(f"{self.path}: write failed, nothing changed ({e})") from None

    def _put_meta(self, txn, key, value):
        txn.put(key.encode(), json.dumps(value).encode(), db=self.dbs["meta"])

    def set_meta(self, **values):
        def change(txn):
            for key, value in values.items():
                self._put_meta(txn, key, value)

        self._write(change)

    def _new_id(self, txn):
        source_id = self.meta(txn)["next_id"]
        self._put_meta(txn, "next_id", source_id + 1)
        return source_id

    def _id_keys(self, txn, name, blob):
        """The `ids` keys naming a stored source: its record's id, or, when the record is unreadable, every
        entry that names it (a scan)."""
        try:
            key = _id_key(SourceRecord.decode(name, blob, keys=[]).info["id"])
        except (ESMIndexError, KeyError, TypeError, struct.error):
            return [k for k, v in txn.cursor(db=self.dbs["ids"]) if v == name.encode()]
        return [key] if txn.get(key, db=self.dbs["ids"]) == name.encode() else []

    def _unlink(self, txn, name):
        """Delete a source and its `ids` entry (corrupt records too). False when there is no such source."""
        blob = txn.get(name.encode(), db=self.dbs["sources"])
        if blob is None:
            return False
        for key in self._id_keys(txn, name, blob):
            txn.delete(key, db=self.dbs["ids"])
        txn.delete(name.encode(), db=self.dbs["sources"])
        return True

    def put(self, record):
        """Insert or replace a source. Returns True when it replaced one of the same name."""

        def change(txn):
            replaced = self._unlink(txn, record.name)
            record.info["id"] = self._new_id(txn)
            txn.put(record.name.encode(), record.encode(), db=self.dbs["sources"])
            txn.put(_id_key(record.info["id"]), record.name.encode(), db=self.dbs["ids"])
            return replaced

        return self._write(change)

    def remove(self, name):
        def change(txn):
            if not self._unlink(txn, name):
                raise ESMIndexError(f"no source named {name!r} in {self.path}")

        self._write(change)

    def rename(self, old, new):
        """Give a source a new name; its bytes and id stay as they are (so this works on a corrupt one too)."""

        def change(txn):
            if txn.get(new.encode(), db=self.dbs["sources"]) is not None:
                raise ESMIndexError(f"a source named {new!r} already exists")
            blob = txn.get(old.encode(), db=self.dbs["sources"])
            if blob is None:
                raise ESMIndexError(f"no source named {old!r} in {self.path}")
            for key in self._id_keys(txn, old, blob):
                txn.put(key, new.encode(), db=self.dbs["ids"])
            txn.put(new.encode(), blob, db=self.dbs["sources"])
            txn.delete(old.encode(), db=self.dbs["sources"])

        self._write(change)

    def rebuild_ids(self):
        """Rewrite the `ids` database from the records: a record whose id is missing or taken gets a new
        one, an unreadable record keeps its entry, and `next_id` moves past every id. Returns the names
        of the records that got a new id."""

        def change(txn):
            infos, corrupt = {}, set()
            for key, blob in txn.cursor(db=self.dbs["sources"]):
                try:
                    infos[key.decode()] = SourceRecord.decode(key.decode(), blob, keys=[]).info
                except ESMIndexError:
                    corrupt.add(key.decode())
            old = self.id_table(txn)
            table = {i: name for i, name in old.items() if name in corrupt}
            renumbered = []
            for name, info in infos.items():
                source_id = info.get("id")
                if type(source_id) is int and source_id >= 0 and source_id not in table:
                    table[source_id] = name
                else:
                    renumbered.append(name)
            txn.drop(self.dbs["ids"], delete=False)
            for source_id, name in table.items():
                txn.put(_id_key(source_id), name.encode(), db=self.dbs["ids"])
            ids = {*old, *table}  # never reuse an id, even one only a damaged table held
            self._put_meta(txn, "next_id", max([self.meta(txn).get("next_id", 0), *(i + 1 for i in ids)]))
            for name in renumbered:
                record = self.get(name, txn)
                record.info["id"] = self._new_id(txn)
                txn.put(name.encode(), record.encode(), db=self.dbs["sources"])
                txn.put(_id_key(record.info["id"]), name.encode(), db=self.dbs["ids"])
            return renumbered

        return self._write(change)


class _Borrowed:
    """A context manager around a transaction someone else owns and will close."""

    def __init__(self, txn):
        self.txn = txn

    def __enter__(self):
        return self.txn

    def __exit__(self, *exc):
        return False
