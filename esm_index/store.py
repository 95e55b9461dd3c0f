"""The LMDB store: the source of truth. One record per source, one write transaction per change.

Layout (named sub-databases of one LMDB environment in the index folder):
- `meta`: JSON values: schema version, base model, dimension, generation, next source id, settings;
- `sources`: source name -> record (a safetensors blob: arrays plus a JSON `info` in its metadata);
- `ids`: source id (8 bytes, big-endian) -> source name, so derived indexes can refer to sources by number.
Every write bumps `generation`, so derived data (the FAISS prefilter) knows when it is stale.
"""

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import lmdb
import numpy as np

from .errors import ESMIndexError

SCHEMA_VERSION = 1
MAP_SIZE = 1 << 30  # initial map size; it doubles on demand


@dataclass
class SourceRecord:
    """Everything stored for one source: its ESM, vectors derived from it, and facts as JSON."""

    name: str
    arrays: dict  # name -> np.ndarray: "esm.weight", "esm.bias", summary statistics, prefilter vectors
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
            data = memoryview(blob)[8 + header_len :]
            arrays = {}
            for key in header if keys is None else keys:
                spec = header[key]
                start, end = spec["data_offsets"]
                dtype = np.dtype(_DTYPES[spec["dtype"]])
                arrays[key] = np.frombuffer(data[start:end], dtype=dtype).reshape(spec["shape"]).copy()
        except Exception as e:  # any parse failure means the same thing: the record is corrupt
            raise ESMIndexError(f"source {name!r}: corrupt record ({type(e).__name__}: {e})") from None
        return cls(name, arrays, info)


_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "U8": "u1"}


def _id_key(source_id):
    return struct.pack(">Q", source_id)


class Store:
    """An LMDB environment holding one index. Open one per process; never share it across fork()."""

    def __init__(self, path, readonly=True):
        self.path = Path(path)
        self.readonly = readonly
        if not (self.path / "data.mdb").is_file():
            raise ESMIndexError(f"{self.path}: not an esm-index index (no data.mdb)")
        self.env = self._open(create=False)
        meta = self.meta()
        version = meta.get("schema_version")
        if version != SCHEMA_VERSION:
            self.close()
            raise ESMIndexError(f"{self.path}: unknown schema version {version!r} (this esm-index reads {SCHEMA_VERSION})")

    def _open(self, create):
        try:
            env = lmdb.open(
                str(self.path), map_size=MAP_SIZE, max_dbs=4, readonly=self.readonly, create=create,
                subdir=True, lock=True, max_readers=256,
            )
        except lmdb.Error as e:
            raise ESMIndexError(f"{self.path}: cannot open the store ({e})") from None
        if self.readonly:
            self.dbs = {name: env.open_db(name.encode(), create=False) for name in ("meta", "sources", "ids")}
        else:
            self.dbs = {name: env.open_db(name.encode()) for name in ("meta", "sources", "ids")}
        return env

    @classmethod
    def create(cls, path, meta):
        """A new, empty store with the given metadata (base model, dimension, settings)."""
        path = Path(path)
        if (path / "data.mdb").exists():
            raise ESMIndexError(f"{path}: an index already exists here")
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise ESMIndexError(f"{path}: exists and is not an empty folder")
        path.mkdir(parents=True, exist_ok=True)
        store = cls.__new__(cls)
        store.path, store.readonly = path, False
        store.env = store._open(create=True)
        with store.env.begin(write=True) as txn:
            for key, value in {**meta, "schema_version": SCHEMA_VERSION, "generation": 0, "next_id": 0}.items():
                txn.put(key.encode(), json.dumps(value).encode(), db=store.dbs["meta"])
        return store

    def close(self):
        self.env.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- reading ---------------------------------------------------------------------------------
    def meta(self, txn=None):
        with self._read(txn) as txn:
            return {k.decode(): json.loads(v) for k, v in txn.cursor(db=self.dbs["meta"])}

    @property
    def generation(self):
        return self.meta()["generation"]

    def _read(self, txn):
        """Use the caller's transaction, or a fresh read-only one (one snapshot: never a torn view)."""
        if txn is not None:
            return _Borrowed(txn)
        return self.env.begin()

    def names(self, txn=None):
        with self._read(txn) as txn:
            return [k.decode() for k in txn.cursor(db=self.dbs["sources"]).iternext(values=False)]

    def __len__(self):
        with self.env.begin() as txn:
            return txn.stat(self.dbs["sources"])["entries"]

    def __contains__(self, name):
        with self.env.begin() as txn:
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

    # -- writing: each method is one transaction -----------------------------------------------
    def _write(self, change):
        """Run change(txn) in one write transaction that also bumps the generation; grow the map if full."""
        if self.readonly:
            raise ESMIndexError(f"{self.path}: opened read-only; cannot write")
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    result = change(txn)
                    self._put_meta(txn, "generation", self.meta(txn)["generation"] + 1)
                    return result
            except lmdb.MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2)

    def _put_meta(self, txn, key, value):
        txn.put(key.encode(), json.dumps(value).encode(), db=self.dbs["meta"])

    def set_meta(self, **values):
        def change(txn):
            for key, value in values.items():
                self._put_meta(txn, key, value)

        self._write(change)

    def put(self, record):
        """Insert or replace a source. Returns True when it replaced one of the same name."""

        def change(txn):
            old = txn.get(record.name.encode(), db=self.dbs["sources"])
            if old is not None:
                txn.delete(_id_key(SourceRecord.decode(record.name, old).info["id"]), db=self.dbs["ids"])
            meta = self.meta(txn)
            record.info["id"] = meta["next_id"]
            self._put_meta(txn, "next_id", meta["next_id"] + 1)
            txn.put(record.name.encode(), record.encode(), db=self.dbs["sources"])
            txn.put(_id_key(record.info["id"]), record.name.encode(), db=self.dbs["ids"])
            return old is not None

        return self._write(change)

    def remove(self, name):
        def change(txn):
            record = self.get(name, txn)
            txn.delete(name.encode(), db=self.dbs["sources"])
            txn.delete(_id_key(record.info["id"]), db=self.dbs["ids"])

        self._write(change)

    def rename(self, old, new):
        def change(txn):
            if txn.get(new.encode(), db=self.dbs["sources"]) is not None:
                raise ESMIndexError(f"a source named {new!r} already exists")
            record = self.get(old, txn)
            txn.delete(old.encode(), db=self.dbs["sources"])
            txn.put(new.encode(), record.encode(), db=self.dbs["sources"])
            txn.put(_id_key(record.info["id"]), new.encode(), db=self.dbs["ids"])

        self._write(change)


class _Borrowed:
    """A context manager around a transaction someone else owns and will close."""

    def __init__(self, txn):
        self.txn = txn

    def __enter__(self):
        return self.txn

    def __exit__(self, *exc):
        return False
