"""The model cache's shared helpers: where it lives, its lock, and the marker that seals a complete model dir.

Used by the model store (models.py) and the demo MoE builder (demo_moe.py): a model dir is built in a staging dir
under the cache lock, sealed (files flushed, then the marker written), and renamed into place whole.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path

MARKER = ".steerserve-complete"


def cache_root() -> Path:
    env = os.environ.get("STEERSERVE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "steerserve"


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (created if missing), across processes."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def seal(out: Path, marker: dict) -> None:
    """Flush every file to disk, then write the marker: after a crash, a marker always means complete files."""
    for f in out.iterdir():
        f.chmod(0o644)  # safetensors writes 0600; the cache may be shared with other users or containers
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    with open(out / MARKER, "w") as fh:
        fh.write(json.dumps(marker, indent=1) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
