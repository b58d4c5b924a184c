"""The adapter registry: tenants' (and global) adapters by name, in the database, their files in the artifact store.

An adapter is a directory of files plus a kind ("lora": PEFT LoRA; "iapt": steering/iapt.py). A registration is
checked once, by its kind's inspector (server/adapters/inspection.py), so that a bad adapter is a 400 naming the
failed check, never a failure inside the engine; the files are then copied into the artifact store, and what was
checked is what the engine loads.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steerserve.server.http.errors import APIError, BadRequest, Unavailable
from steerserve.server.stores.artifacts import ArtifactStore, StoreUnavailable
from steerserve.server.stores.database import Database, as_database
from steerserve.server.stores.profiles import GLOBAL, validate_name

from . import files
from .inspection import (  # noqa: F401 (re-exported: the registry's callers check adapters through it)
    CONFIG_FILE,
    INSPECTORS,
    KIND_FILES,
    WEIGHTS_FILE,
    AdapterInvalid,
    ServedModel,
    inspect_iapt,
    inspect_lora,
)

log = logging.getLogger("steerserve.adapters")
MIGRATIONS = ("""
CREATE TABLE IF NOT EXISTS adapters (
    id      {id},  -- stable engine id (LoRARequest.lora_int_id); never reused
    tenant  TEXT NOT NULL,
    name    TEXT NOT NULL,
    kind    TEXT NOT NULL,
    path    TEXT NOT NULL,
    owned   INTEGER NOT NULL,  -- 1: the files were uploaded and the server deletes them with the adapter
    meta    TEXT NOT NULL,     -- JSON: what the inspector found (rank, alpha, target modules, base model)
    created {real} NOT NULL,
    UNIQUE (tenant, name)
)
""",)


def validate_adapter_name(name: object, param: str = "name") -> str:
    """The adapter name if it matches [A-Za-z0-9_.-]{1,64}; BadRequest naming `param` otherwise."""
    try:
        return validate_name(name)
    except BadRequest:
        raise BadRequest(f"invalid adapter name {str(name)[:80]!r}: use 1-64 of A-Z a-z 0-9 _ . -", param=param,
                         code="invalid_value") from None


@dataclass(frozen=True)
class Adapter:
    id: int
    tenant: str  # owner: a tenant, or GLOBAL
    name: str
    kind: str
    path: Path
    owned: bool
    meta: dict[str, Any]
    created: float

    @property
    def scope(self) -> str:
        return "global" if self.tenant == GLOBAL else "tenant"

    @property
    def engine_name(self) -> str:
        """Unique per registration: vLLM keys its prefix cache and CPU cache by this name and path."""
        return f"{self.tenant}/{self.name}#{self.id}"

    def public(self) -> dict[str, Any]:
        # `source`: the directory a path registration was copied from; `sha256`: the stored files' checksums.
        meta = {k: v for k, v in self.meta.items() if k not in ("artifact", "source")}
        source = self.meta.get("source") or ("upload" if self.owned else str(self.path))
        return {"name": self.name, "scope": self.scope, "kind": self.kind, "created": self.created,
                "source": source, **meta}


class AdapterStore:
    """Registrations keyed by (tenant, name), own before global; thread-safe, durable across restarts. Adapter
    files live in the artifact store `artifacts` (default: the local directory `files_dir`; a remote store
    caches them in `files_dir`) and belong to the registry: uploads, and copies of adapters registered by path,
    written crash-safe and checksummed (server/adapters/files.py); local orphans are swept when the store opens.
    `materialise` gives the verified local directory the engine loads from. `recheck` re-inspects the stored
    registrations at start-up: a broken one stays registered and each request for it is refused (`broken`), the
    rest serve."""

    def __init__(self, db: str | Path | Database, files_dir: str | Path, artifacts: ArtifactStore | None = None):
        # SQLite: synchronous=FULL, a committed registration survives a power loss too.
        self.db, self._owns_db = as_database(db, synchronous="FULL"), not isinstance(db, Database)
        self.artifacts = artifacts or ArtifactStore(files_dir)
        self.path, self.files_dir = self.db.path, self.artifacts.local_dir
        self.db.migrate("adapters", MIGRATIONS)
        self._broken: dict[int, str] = {}  # registration id -> why it cannot be served (`recheck`)
        self._dir_fd, alone = files.claim(self.artifacts)
        if alone:  # no other server on this directory (they may share it, on one database): sweep it
            files.sweep(self.artifacts, {self.local_dir(a).resolve() for a in self.all()})
        files.release(self._dir_fd)

    def close(self) -> None:
        os.close(self._dir_fd)
        if self._owns_db:
            self.db.close()

    def register(self, tenant: str, name: str, kind: str, path: Path, base: ServedModel,
                 owned: bool = False) -> tuple[Adapter, Adapter | None]:
        """Validate and store; returns (the new registration, the one it replaced or None). An upload (`owned`,
        staged by `upload_dir`) is moved into the artifact store; an adapter registered by path is copied into it
        first (then validated), so what was validated is what the engine loads, whatever happens to the path."""
        validate_name(name)
        if kind not in INSPECTORS:
            raise BadRequest(f"unknown adapter kind {kind!r} (supported: {sorted(INSPECTORS)})", param="kind",
                             code="invalid_value")
        source = None
        if not owned:
            try:
                source, path, owned = path, files.copy_in(path, KIND_FILES[kind], self.artifacts), True
            except OSError as exc:
                raise AdapterInvalid("files", f"cannot read {path}: {exc.strerror or exc}") from None
        staged, stored, done = files.is_staged(path, self.artifacts), {}, False
        try:
            meta = INSPECTORS[kind](path, base)
            if source is not None:
                meta["source"] = str(source)
            if staged:  # durable and in place before the row that points to it is committed
                path, stored = files.publish(path, self.artifacts)
            registered = self._insert(tenant, name, kind, path, owned, {**meta, **stored})
            done = True
            return registered
        except StoreUnavailable as exc:
            raise Unavailable(f"the adapter could not be stored: {exc}", param="adapter",
                              code="artifact_store_unavailable") from None
        finally:
            if not done and stored:  # published, but the row was not committed
                files.delete(self.artifacts, stored["artifact"])
            elif not done and source is not None:  # our copy (an upload's staging directory is the caller's)
                shutil.rmtree(path, ignore_errors=True)

    def _insert(self, tenant: str, name: str, kind: str, path: Path, owned: bool, meta: dict
                ) -> tuple[Adapter, Adapter | None]:
        # Replacing is two rows (the old one goes, the new one with a new id comes): one transaction, under the
        # table's write lock so that two replicas registering the same name serialise.
        with self.db.transaction(lock="adapters") as tx:
            old = tx.execute(f"DELETE FROM adapters WHERE tenant = ? AND name = ? RETURNING {_COLUMNS}",
                             (tenant, name)).one()
            row = tx.execute(
                "INSERT INTO adapters (tenant, name, kind, path, owned, meta, created) VALUES (?,?,?,?,?,?,?) "
                f"RETURNING {_COLUMNS}", (tenant, name, kind, str(path), int(owned), json.dumps(meta), time.time())
            ).one()
        assert row is not None
        return _adapter(row), _adapter(old) if old else None

    def upload_dir(self) -> Path:
        """A fresh staging directory for one upload's files (`register` publishes it; on failure the caller
        deletes it; a crash leaves it to the next start-up's sweep)."""
        return self.artifacts.staging_dir()

    def local_dir(self, adapter: Adapter) -> Path:
        """Where `adapter`'s files are (or will be, once materialised) on this machine; no I/O."""
        return files.local_dir(self.artifacts, adapter)

    def localised(self, adapter: Adapter) -> Adapter:
        """`adapter` with `path` set to its files' directory on this machine (the registering replica's path is
        recorded; another replica keeps its cache elsewhere). What the engine and the IAPT hook are given."""
        return dataclasses.replace(adapter, path=self.local_dir(adapter))

    def materialise(self, adapter: Adapter) -> Path:
        """The local directory of `adapter`'s files, fetched into this machine's cache if the store is remote,
        every file checked against the sha256 recorded at registration. A missing or corrupt artifact is a 400
        naming the adapter (`adapter_files_missing` / `adapter_files_corrupt`), an unreachable store a 503; never
        an engine failure. Registrations older than the artifact store are read from their path unchecked."""
        return files.materialise(self.artifacts, adapter)

    def recheck(self, base: ServedModel) -> dict[str, str]:
        """Materialise and inspect every stored registration again (start-up: files may have changed or broken
        while the server was down). Returns {"<tenant>/<name>": why} for the broken ones, which `broken` then
        reports. A remote store that cannot be reached marks nothing broken (each request then tries again)."""
        broken = {}
        for adapter in self.all():
            try:
                path = self.materialise(adapter)
                INSPECTORS[adapter.kind](path, base) if adapter.kind in INSPECTORS else None
            except Unavailable as exc:
                log.warning("adapter %s not checked at start-up: %s", adapter.engine_name, exc.message)
            except (APIError, OSError, ValueError) as exc:
                broken[adapter.id] = exc.message if isinstance(exc, APIError) else f"{type(exc).__name__}: {exc}"
        self._broken = broken
        return {f"{a.tenant}/{a.name}": broken[a.id] for a in self.all() if a.id in broken}

    def broken(self, adapter: Adapter) -> str | None:
        """Why `adapter` cannot be served (found broken by `recheck`), or None."""
        return self._broken.get(adapter.id)

    def get(self, tenant: str, name: str) -> Adapter | None:
        """The adapter in exactly `tenant`'s scope."""
        validate_name(name)
        return self._get(tenant, name)

    def resolve(self, tenant: str, name: str) -> Adapter | None:
        """What a request of `tenant` means by `name`: its own adapter, else a global one, else None."""
        validate_name(name)
        row = self.db.query_one(f"SELECT {_COLUMNS} FROM adapters WHERE name = ? AND tenant IN (?, ?) "
                                "ORDER BY tenant = ? LIMIT 1", (name, tenant, GLOBAL, GLOBAL))
        return _adapter(row) if row else None

    def delete(self, tenant: str, name: str) -> Adapter | None:
        """Remove the registration (not its files: the pool deletes owned files once no request uses them)."""
        validate_name(name)
        row = self.db.query_one(f"DELETE FROM adapters WHERE tenant = ? AND name = ? RETURNING {_COLUMNS}",
                                (tenant, name))
        return _adapter(row) if row else None

    def list(self, tenant: str) -> list[Adapter]:
        rows = self.db.query(f"SELECT {_COLUMNS} FROM adapters WHERE tenant IN (?, ?) ORDER BY name, tenant = ?",
                             (tenant, GLOBAL, GLOBAL))
        return [_adapter(r) for r in rows]

    def all(self) -> list[Adapter]:
        return [_adapter(r) for r in self.db.query(f"SELECT {_COLUMNS} FROM adapters ORDER BY id")]

    def remove_files(self, adapter: Adapter) -> None:
        """Delete an owned adapter's artifact (from the store and this machine's cache) once it is retired."""
        if adapter.owned and adapter.meta.get("artifact"):
            files.delete(self.artifacts, adapter.meta["artifact"])
        elif adapter.owned and self.files_dir in adapter.path.parents:
            shutil.rmtree(adapter.path, ignore_errors=True)

    def _get(self, tenant: str, name: str) -> Adapter | None:
        row = self.db.query_one(f"SELECT {_COLUMNS} FROM adapters WHERE tenant = ? AND name = ?", (tenant, name))
        return _adapter(row) if row else None


_COLUMNS = "id, tenant, name, kind, path, owned, meta, created"


def _adapter(row: tuple) -> Adapter:
    adapter_id, tenant, name, kind, path, owned, meta, created = row
    return Adapter(adapter_id, tenant, name, kind, Path(path), bool(owned), json.loads(meta), created)
