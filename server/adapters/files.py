"""Adapter files in the artifact store (server/stores/artifacts.py), crash-safe: an upload (or the copy of an
adapter registered by path) is assembled in a local staging directory, validated there, published to the store
(atomically, checksummed), and only then is its registration committed (server/adapters/registry.py). A crash at
any point leaves either nothing the registry points to, or a complete, durable artifact it points to; what is
left over locally (a half-written upload, a published directory whose row was never committed, the files of a
deleted adapter the server died before removing, a remote store's cached copy of an adapter deleted elsewhere) is
swept at the next start-up by `sweep`.

Layout under the store's local directory (the files themselves, or a remote store's cache):
`.staging/upload-*/` (in progress; all of it is garbage at start-up) and `<id>/` (published, kept while a
registration owns them). A registration records its artifact as `meta["artifact"]` (the key, `<id>`) and
`meta["sha256"]` ({file: sha256}); registrations made before the artifact store have neither, and are read from
their recorded path unchecked.
"""
from __future__ import annotations

import fcntl
import logging
import os
import shutil
import uuid
from pathlib import Path

from steerserve.server.http.errors import BadRequest, Unavailable
from steerserve.server.stores.artifacts import (
    STAGING,
    ArtifactError,
    ArtifactMissing,
    ArtifactStore,
    StoreUnavailable,
)

log = logging.getLogger("steerserve.adapters")


def is_staged(path: Path, store: ArtifactStore) -> bool:
    return (store.local_dir / STAGING) in path.parents


def copy_in(source: Path, names: tuple[str, ...], store: ArtifactStore) -> Path:
    """A staging directory holding a copy of the files `names` of the adapter directory `source` (those it has:
    the inspector reports a missing one). Registration validates and stores the copy, so a file changed or
    broken at `source` later cannot change what the engine loads."""
    staged = store.staging_dir()
    try:
        for name in names:
            if (source / name).is_file():
                shutil.copyfile(source / name, staged / name)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return staged


def publish(staged: Path, store: ArtifactStore) -> tuple[Path, dict]:
    """Publish a complete staged adapter under a fresh key; returns its local directory and the
    `{"artifact": key, "sha256": {file: sum}}` a registration records."""
    key = uuid.uuid4().hex
    final, sums = store.publish_dir(staged, key)
    return final, {"artifact": key, "sha256": sums}


def local_dir(store: ArtifactStore, adapter) -> Path:
    """Where the registration `adapter`'s files are (or will be, once materialised) on this machine; no I/O."""
    key = adapter.meta.get("artifact")
    return store.local_path(key) if key else adapter.path


def materialise(store: ArtifactStore, adapter) -> Path:
    """The local directory of the registration `adapter`'s files, fetched into this machine's cache if the store is
    remote, each file checked against the sha256 recorded at registration. A missing or corrupt artifact is a
    400 naming the adapter (`adapter_files_missing` / `adapter_files_corrupt`), an unreachable store a 503
    (`artifact_store_unavailable`); never an engine failure. Registrations older than the artifact store are
    read from their path unchecked."""
    key = adapter.meta.get("artifact")
    if not key:
        return adapter.path
    try:
        return store.fetch_dir(key, adapter.meta.get("sha256") or {})
    except StoreUnavailable as exc:
        raise Unavailable(f"adapter '{adapter.name}' cannot be fetched now: {exc}", param="model",
                          code="artifact_store_unavailable") from None
    except ArtifactError as exc:
        what = "missing" if isinstance(exc, ArtifactMissing) else "corrupt"
        log.error("adapter %s: its stored files are %s: %s", adapter.engine_name, what, exc)
        raise BadRequest(f"adapter '{adapter.name}' cannot be served: its stored files are {what} ({exc}); "
                         "register it again", param="model", code=f"adapter_files_{what}") from None


def delete(store: ArtifactStore, key: str) -> None:
    """Remove an adapter's artifact; a failure is logged (what is left is harmless: nothing points to it)."""
    try:
        store.delete(key)
    except ArtifactError as exc:
        log.warning("could not delete adapter artifact %s: %s", key, exc)


def claim(store: ArtifactStore) -> tuple[int, bool]:
    """Hold the local directory for this store's lifetime: a shared lock on the directory itself (flock), taken
    after trying an exclusive one. Returns (the descriptor to close with the store, whether no other store held
    the directory: only then may `sweep` run, since another server sharing the directory may be uploading)."""
    fd = os.open(store.local_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        alone = True
    except BlockingIOError:
        alone = False
    return fd, alone


def release(fd: int) -> None:
    """Turn `claim`'s exclusive lock into a shared one (after the sweep), or drop it (`os.close` at the end)."""
    fcntl.flock(fd, fcntl.LOCK_SH)


def sweep(store: ArtifactStore, keep: set[Path]) -> list[Path]:
    """Remove every local adapter directory no registration points to (`keep`: the resolved local paths of all
    registrations) and the whole staging area; returns what was removed. Only directories this module names (a
    32-hex id, or an older server's `upload-*`) are candidates, so nothing else in the directory is touched. Runs
    at start-up, when `claim` found no other store on the directory, so no upload can be in progress. Never
    touches a remote store: another replica may be publishing into it right now."""
    removed = []
    files_dir = store.local_dir
    for entry in sorted(files_dir.iterdir()) if files_dir.is_dir() else ():
        if entry.name == STAGING:
            for staged in sorted(entry.iterdir()):
                removed.append(staged)
                shutil.rmtree(staged, ignore_errors=True)
        elif entry.is_dir() and _is_upload_name(entry.name) and entry.resolve() not in keep:
            removed.append(entry)
            shutil.rmtree(entry, ignore_errors=True)
    if removed:
        log.warning("removed %d orphaned adapter upload(s): %s", len(removed), ", ".join(p.name for p in removed))
    return removed


def _is_upload_name(name: str) -> bool:
    return name.startswith("upload-") or (len(name) == 32 and all(c in "0123456789abcdef" for c in name))
