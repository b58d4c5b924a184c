"""Uploaded adapter files on disk, crash-safe: an upload is written into a staging directory, fsynced, renamed
into place, and only then is its registration committed (server/adapters/registry.py). A crash at any point
leaves either nothing the registry points to, or a complete, durable directory it points to; what is left over
(a half-written upload, a published directory whose row was never committed, the files of a deleted adapter the
server died before removing) is swept at the next start-up by `sweep`.

Layout under the store's `files_dir`: `.staging/upload-*/` (in progress; all of it is garbage at start-up) and
`<id>/` (published uploads, kept while a registration owns them).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path

log = logging.getLogger("steerserve.adapters")

STAGING = ".staging"


def staging_dir(files_dir: Path) -> Path:
    """A fresh directory for one upload's files, under `files_dir/.staging`."""
    root = files_dir / STAGING
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="upload-", dir=root))


def is_staged(path: Path, files_dir: Path) -> bool:
    return (files_dir / STAGING) in path.parents


def publish(staged: Path, files_dir: Path) -> Path:
    """Make a complete staged upload durable and move it into place; returns its final directory. Every file and
    both directories are fsynced, so after a crash the published directory is either absent or complete."""
    for file in staged.iterdir():
        _fsync(file)
    _fsync(staged)
    final = files_dir / uuid.uuid4().hex
    os.rename(staged, final)
    _fsync(files_dir)
    _fsync(staged.parent)
    return final


def sweep(files_dir: Path, keep: set[Path]) -> list[Path]:
    """Remove every upload directory no registration points to (`keep`: the resolved paths of all registrations)
    and the whole staging area; returns what was removed. Only directories this module names (a 32-hex id, or an
    older server's `upload-*`) are candidates, so nothing else in `files_dir` is touched. Runs at start-up,
    before any upload can be in progress."""
    removed = []
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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
