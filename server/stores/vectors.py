"""Named control vectors per tenant (plus admin-managed global ones): metadata through the repository layer
(server/stores/database.py: SQLite by default, or PostgreSQL), the directions as
safetensors files named by their content digest (so equal vectors registered twice share one file), in the
artifact store (server/stores/artifacts.py: a local directory, or a shared remote store read through a local
cache). The digest is the checksum: a file read back is decoded and its digest recomputed, so a corrupt or
missing file is a clear 400 for the request that names the vector, never a wrong steering.

Scoping is the profiles' (server/stores/profiles.py): a tenant sees its own vectors and the global ones, its own
shadowing a global one of the same name; writes address exactly one scope. Vectors are checked against the served
model by the caller (the route) before `put`; the store only keeps them.
"""
from __future__ import annotations

import json
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steerserve.server.http.errors import BadRequest, Unavailable
from steerserve.steering.control_vectors import ControlVector
from steerserve.steering.vector_files import read_vector_file, write_vector_file

from .artifacts import ArtifactError, ArtifactStore, StoreUnavailable
from .database import Database, as_database
from .profiles import GLOBAL, _check_tenant

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
CACHE_BYTES = 256 << 20  # decoded vectors kept in memory, most recently used first

MIGRATIONS = ("""
CREATE TABLE IF NOT EXISTS vectors (
    tenant      TEXT NOT NULL,
    name        TEXT NOT NULL,
    digest      TEXT NOT NULL,     -- ControlVector.digest(): the file's name and what plans key on
    layers      TEXT NOT NULL,     -- JSON list of 0-based decoder layers
    hidden_size INTEGER NOT NULL,
    model_hint  TEXT NOT NULL,
    updated     {real} NOT NULL,   -- unix seconds
    PRIMARY KEY (tenant, name)
)
""",)


def validate_vector_name(name: object, param: str = "name") -> str:
    """The vector name if it matches [A-Za-z0-9_.-]{1,64}; BadRequest(param) otherwise."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise BadRequest(f"invalid vector name {str(name)[:80]!r}: use 1-64 of A-Z a-z 0-9 _ . -", param=param,
                         code="invalid_value")
    return name


@dataclass(frozen=True)
class StoredVector:
    """One registration: who owns it, under which name, and what it holds."""

    owner: str  # a tenant, or GLOBAL
    name: str
    digest: str
    layers: tuple[int, ...]
    hidden_size: int
    model_hint: str
    updated: float

    def public(self) -> dict[str, Any]:
        return {"object": "steering.vector", "name": self.name, "scope": "global" if self.owner == GLOBAL else
                "tenant", "digest": self.digest, "layers": list(self.layers), "hidden_size": self.hidden_size,
                "model_hint": self.model_hint, "updated": self.updated}


class VectorStore:
    """Vectors keyed by (tenant, name); thread-safe, durable across restarts (a put returns once the file and its
    row are written). Rows are read from the database on every call (another replica's registration is seen);
    only decoded directions are cached, keyed by their content digest (immutable). `db`: a Database, or the path
    of an SQLite file. Files: `artifacts`, default the local directory `files_dir`."""

    def __init__(self, db: str | Path | Database, files_dir: str | Path, artifacts: ArtifactStore | None = None):
        self.db, self._owns_db = as_database(db), not isinstance(db, Database)
        self.artifacts = artifacts or ArtifactStore(files_dir)
        self.path, self.files = self.db.path, self.artifacts.local_dir
        self._lock = threading.Lock()  # the cache and the files
        self._cache: OrderedDict[str, ControlVector] = OrderedDict()
        self._cached_bytes = 0
        self.db.migrate("vectors", MIGRATIONS)

    def close(self) -> None:
        if self._owns_db:
            self.db.close()

    def __repr__(self) -> str:
        return f"VectorStore({self.db!r})"

    @staticmethod
    def _key(digest: str) -> str:
        return f"{digest}.safetensors"

    def put(self, tenant: str, name: str, vector: ControlVector) -> StoredVector:
        """Create or replace the vector `name` in `tenant`'s scope (GLOBAL for global ones)."""
        _check_tenant(tenant)
        validate_vector_name(name)
        digest = vector.digest()
        record = StoredVector(tenant, name, digest, vector.layers, vector.hidden_size, vector.model_hint, time.time())
        with self._lock:
            self._write(digest, vector)
            with self.db.transaction(lock="vectors") as tx:  # the row and the old file's last reference: one write
                old = tx.execute("SELECT digest FROM vectors WHERE tenant = ? AND name = ?", (tenant, name)).one()
                tx.execute(
                    "INSERT INTO vectors (tenant, name, digest, layers, hidden_size, model_hint, updated) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (tenant, name) DO UPDATE SET digest = excluded.digest, "
                    "layers = excluded.layers, hidden_size = excluded.hidden_size, "
                    "model_hint = excluded.model_hint, updated = excluded.updated",
                    (tenant, name, digest, json.dumps(list(record.layers)), record.hidden_size, record.model_hint,
                     record.updated))
                orphan = old is not None and old[0] != digest and _unreferenced(tx, old[0])
            if orphan:
                self._drop_file(old[0])
            self._remember(digest, vector)
        return record

    def get(self, tenant: str, name: str) -> tuple[StoredVector, ControlVector] | None:
        """The vector in exactly `tenant`'s scope (no global fallback), or None."""
        _check_tenant(tenant)
        validate_vector_name(name)
        return self._load("tenant = ?", (name, tenant))

    def resolve(self, tenant: str, name: str) -> tuple[StoredVector, ControlVector] | None:
        """The vector a request of `tenant` means by `name`: its own if any, else the global one, else None."""
        _check_tenant(tenant)
        validate_vector_name(name)
        return self._load("tenant IN (?, ?) ORDER BY tenant = ? LIMIT 1", (name, tenant, GLOBAL, GLOBAL))

    def delete(self, tenant: str, name: str) -> bool:
        """Delete the vector in exactly `tenant`'s scope; False if there was none."""
        _check_tenant(tenant)
        validate_vector_name(name)
        with self._lock:
            with self.db.transaction(lock="vectors") as tx:
                row = tx.execute("DELETE FROM vectors WHERE tenant = ? AND name = ? RETURNING digest",
                                 (tenant, name)).one()
                orphan = row is not None and _unreferenced(tx, row[0])
            if orphan:
                self._drop_file(row[0])
        return row is not None

    def list(self, tenant: str) -> list[StoredVector]:
        """`tenant`'s own vectors and the global ones, by name (own before global on a tie)."""
        _check_tenant(tenant)
        rows = self.db.query(f"SELECT {_COLUMNS} FROM vectors WHERE tenant IN (?, ?) ORDER BY name, tenant = ?",
                             (tenant, GLOBAL, GLOBAL))
        return [_record(row) for row in rows]

    # --- internals (called with the lock held, except _load which takes it) ---

    def _load(self, where: str, args: tuple) -> tuple[StoredVector, ControlVector] | None:
        row = self.db.query_one(f"SELECT {_COLUMNS} FROM vectors WHERE name = ? AND {where}", args)
        if row is None:
            return None
        record = _record(row)
        with self._lock:
            vector = self._cache.get(record.digest)
            if vector is None:
                vector = self._read(record)
                self._remember(record.digest, vector)
            else:
                self._cache.move_to_end(record.digest)
        return record, vector

    def _write(self, digest: str, vector: ControlVector) -> None:
        """Store the file of `digest` unless the store has it (atomically: a temporary file or key, then the
        final one)."""
        try:
            if self.artifacts.exists(self._key(digest)):
                return
            temp = self.artifacts.temp_file(".safetensors")
            try:
                write_vector_file(vector, temp)
                self.artifacts.put_file(temp, self._key(digest))
            finally:
                temp.unlink(missing_ok=True)
        except StoreUnavailable as exc:
            raise Unavailable(f"the vector could not be stored: {exc}", param="vector",
                              code="artifact_store_unavailable") from None

    def _read(self, record: StoredVector) -> ControlVector:
        """The vector of `record`, read through the artifact store and checked against its digest."""
        key = self._key(record.digest)
        try:
            vector = read_vector_file(self.artifacts.fetch_file(key))
            if vector.digest() != record.digest:
                raise ValueError(f"its content digest is {vector.digest()}, not the recorded {record.digest}")
            return vector
        except StoreUnavailable as exc:
            raise Unavailable(f"vector '{record.name}' cannot be fetched now: {exc}", param="steering",
                              code="artifact_store_unavailable") from None
        except (ArtifactError, ValueError, OSError) as exc:
            self.artifacts.evict(key)  # a remote store's bad cached copy is fetched afresh next time
            raise BadRequest(f"vector '{record.name}' cannot be used: its stored file is missing or corrupt "
                             f"({exc}); register it again", param="steering", code="vector_file_corrupt") from None

    def _remember(self, digest: str, vector: ControlVector) -> None:
        if digest in self._cache:
            self._cache.move_to_end(digest)
            return
        self._cache[digest] = vector
        self._cached_bytes += _nbytes(vector)
        while self._cached_bytes > CACHE_BYTES and len(self._cache) > 1:
            _, dropped = self._cache.popitem(last=False)
            self._cached_bytes -= _nbytes(dropped)

    def _drop_file(self, digest: str) -> None:
        """Remove the file of `digest`, which no registration refers to any more."""
        try:
            self.artifacts.delete(self._key(digest))
        except ArtifactError:  # left in the store: harmless, nothing points to it
            pass
        if (dropped := self._cache.pop(digest, None)) is not None:
            self._cached_bytes -= _nbytes(dropped)


_COLUMNS = "tenant, name, digest, layers, hidden_size, model_hint, updated"


def _unreferenced(tx, digest: str) -> bool:
    return tx.execute("SELECT 1 FROM vectors WHERE digest = ? LIMIT 1", (digest,)).one() is None


def _record(row: tuple) -> StoredVector:
    tenant, name, digest, layers, hidden_size, hint, updated = row
    return StoredVector(tenant, name, digest, tuple(json.loads(layers)), hidden_size, hint, updated)


def _nbytes(vector: ControlVector) -> int:
    return sum(d.nbytes for d in vector.directions.values())


def default_store(data_dir: str | os.PathLike[str], artifacts: ArtifactStore | None = None) -> VectorStore:
    """The store a server with this --data-dir keeps its vectors in (files: `artifacts`, default the local
    `<data-dir>/vectors`)."""
    return VectorStore(Path(data_dir) / "vectors.sqlite3", Path(data_dir) / "vectors", artifacts)
