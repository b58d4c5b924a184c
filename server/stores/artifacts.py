"""The artifact store: where uploaded adapter and vector files live, shared by every replica of a deployment.

An artifact is a file or a directory of files under a relative key (`<id>/adapter_model.safetensors`,
`<digest>.safetensors`). Two backends behind one class:

- **local** (the default, `url` None): the files live in `local_dir` itself, exactly today's layout
  (`<data-dir>/adapters/<id>/`, `<data-dir>/vectors/<digest>.safetensors`), so existing data keeps working.
- **remote** (`url` any fsspec URL, e.g. `s3://bucket/prefix/adapters`): the files live at `<url>/<key>`, and
  `local_dir` is this replica's read-through cache of them, in the same layout. vLLM and the IAPT hook read
  adapters from a local directory, so every artifact is materialised into the cache before it is used.

Writes are atomic: a local file is written under a temporary name, fsynced and renamed; a remote file is uploaded
to a temporary key (`<key>.tmp-<uuid>`) and then moved to its final key, so a reader never sees a partial object.
What is written is checksummed (sha256, returned to the caller, who records it with the registration), and
`fetch_dir` verifies every file against those sums before handing out its local path: a missing artifact raises
`ArtifactMissing`, a corrupt one `ArtifactCorrupt` (a corrupt cached copy is dropped and fetched once more first),
an unreachable store `StoreUnavailable`. Callers turn them into clear per-request errors; nothing corrupt reaches
the engine.

fsspec (and s3fs for s3:// URLs) is imported only when a remote store is opened.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

STAGING = ".staging"  # temporary local files and directories, under local_dir (swept at start-up)
CHUNK = 1 << 20


class ArtifactError(Exception):
    """An artifact that cannot be used; `key` names it."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


class ArtifactMissing(ArtifactError):
    pass


class ArtifactCorrupt(ArtifactError):
    pass


class StoreUnavailable(ArtifactError):
    """The remote store could not be reached or refused the operation (network, credentials, throttling)."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ArtifactStore:
    """Artifacts under `local_dir` (local) or under `url` with `local_dir` as the cache (remote). Thread-safe:
    every write goes through a unique temporary name and one atomic rename or move."""

    def __init__(self, local_dir: str | Path, url: str | None = None, storage_options: dict[str, Any] | None = None):
        self.local_dir = Path(local_dir)
        self.local_dir.mkdir(parents=True, exist_ok=True)
        self.url = url.rstrip("/") if url else None
        self._fs = None
        if self.url is not None:
            import fsspec  # only here: a local store never imports fsspec or s3fs

            self._fs, self._root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
            self._root = self._root.rstrip("/")

    @property
    def remote(self) -> bool:
        return self._fs is not None

    def __repr__(self) -> str:
        return f"ArtifactStore({self.url or str(self.local_dir)!r})"

    def local_path(self, key: str) -> Path:
        """Where the artifact `key` is (local) or is cached (remote) on this machine; no I/O."""
        return self.local_dir / _check_key(key)

    def staging_dir(self) -> Path:
        """A fresh local directory to assemble an artifact in (then `publish_dir`)."""
        root = self.local_dir / STAGING
        root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="upload-", dir=root))

    # --- writing -----------------------------------------------------------------------------------------------
    def publish_dir(self, staged: Path, key: str) -> tuple[Path, dict[str, str]]:
        """Move the complete local directory `staged` to the artifact `key`; returns its local path and the sha256
        of each file. Local: every file and both directories are fsynced around the rename, so after a crash the
        artifact is absent or complete. Remote: each file is uploaded atomically, then `staged` becomes the
        cached copy."""
        sums = {f.name: sha256_file(f) for f in sorted(staged.iterdir()) if f.is_file()}
        final = self.local_path(key)
        if self.remote:
            for name in sums:
                self._upload(staged / name, f"{key}/{name}")
        for name in sums:
            fsync(staged / name)
        fsync(staged)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(staged, final)
        fsync(final.parent)
        fsync(staged.parent)
        return final, sums

    def put_file(self, source: Path, key: str) -> str:
        """Store the local file `source` (consumed: moved, not copied) as the artifact `key`; returns its sha256."""
        checksum = sha256_file(source)
        if self.remote:
            self._upload(source, key)
        fsync(source)
        final = self.local_path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, final)
        fsync(final.parent)
        return checksum

    def temp_file(self, suffix: str = "") -> Path:
        """A fresh local path for a file to be `put_file`d: a hidden name beside the final files (the same
        filesystem, so the final rename is atomic)."""
        return self.local_dir / f".tmp-{uuid.uuid4().hex}{suffix}"

    def exists(self, key: str) -> bool:
        if not self.remote:
            return self.local_path(key).exists()
        self._fs.invalidate_cache()  # another replica may have written or deleted it meanwhile
        return self._call(key, lambda: self._fs.exists(self._remote(key)))

    def delete(self, key: str) -> None:
        """Remove the artifact (a file or a directory) from the store and from this machine's cache."""
        local = self.local_path(key)
        if self.remote:
            remote = self._remote(key)
            self._call(key, lambda: self._fs.rm(remote, recursive=True) if self._fs.exists(remote) else None)
        if local.is_dir():
            shutil.rmtree(local, ignore_errors=True)
        else:
            local.unlink(missing_ok=True)

    # --- reading -----------------------------------------------------------------------------------------------
    def fetch_dir(self, key: str, sums: dict[str, str]) -> Path:
        """The local directory of the artifact `key`, each of whose files `sums` names matches its sha256 (fetched
        into the cache first if remote). Raises ArtifactMissing, ArtifactCorrupt or StoreUnavailable."""
        local = self.local_path(key)
        problem = _verify(local, sums)
        if problem is None:
            return local
        if not self.remote:
            raise (ArtifactMissing if "missing" in problem else ArtifactCorrupt)(key, problem)
        # Remote: the cached copy is absent or bad; fetch a fresh one into staging, verify it, swap it in.
        staged = self.staging_dir()
        try:
            for name in sums:
                self._download(f"{key}/{name}", staged / name)
            problem = _verify(staged, sums)
            if problem is not None:
                raise ArtifactCorrupt(key, f"{problem} (in the store at {self._remote(key)})")
            if local.exists():
                shutil.rmtree(local, ignore_errors=True)
            local.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(staged, local)
            except OSError:  # another thread cached it meanwhile
                if _verify(local, sums) is not None:
                    raise
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        return local

    def fetch_file(self, key: str) -> Path:
        """The local path of the file artifact `key` (downloaded into the cache first if remote and not cached).
        The caller checks its content (and calls `evict` if it is wrong)."""
        local = self.local_path(key)
        if local.is_file():
            return local
        if not self.remote:
            raise ArtifactMissing(key, f"{key} is missing from {self.local_dir}")
        temp = self.temp_file()
        try:
            self._download(key, temp)
            local.parent.mkdir(parents=True, exist_ok=True)
            os.replace(temp, local)
        finally:
            temp.unlink(missing_ok=True)
        return local

    def evict(self, key: str) -> None:
        """Drop this machine's cached copy of `key` (remote stores only; a local store's files are the artifact)."""
        if self.remote:
            local = self.local_path(key)
            shutil.rmtree(local, ignore_errors=True) if local.is_dir() else local.unlink(missing_ok=True)

    def probe(self) -> None:
        """Write and delete a small object (remote stores): StoreUnavailable if the store cannot be written."""
        if not self.remote:
            return
        probe, key = self.temp_file(), f".probe-{uuid.uuid4().hex}"
        try:
            probe.write_bytes(b"steerserve artifact store probe\n")
            self._call(key, lambda: self._fs.put_file(str(probe), self._remote(key)))
            self._call(key, lambda: self._fs.rm(self._remote(key)))
        finally:
            probe.unlink(missing_ok=True)

    # --- internals ---------------------------------------------------------------------------------------------
    def _remote(self, key: str) -> str:
        return f"{self._root}/{_check_key(key)}"

    def _upload(self, source: Path, key: str) -> None:
        final = self._remote(key)
        temp = f"{final}.tmp-{uuid.uuid4().hex}"

        def upload() -> None:
            self._fs.put_file(str(source), temp)
            try:
                self._fs.mv(temp, final)
            except BaseException:
                self._fs.rm(temp)
                raise
        self._call(key, upload)

    def _download(self, key: str, target: Path) -> None:
        self._fs.invalidate_cache()  # another replica may have written it since this one last listed the store
        try:
            self._call(key, lambda: self._fs.get_file(self._remote(key), str(target)))
        except ArtifactMissing:
            raise ArtifactMissing(key, f"{key} is missing from the artifact store {self.url}") from None

    def _call(self, key: str, action):
        try:
            return action()
        except FileNotFoundError as exc:
            raise ArtifactMissing(key, f"{key} is missing from the artifact store {self.url}: {exc}") from None
        except (OSError, ValueError, RuntimeError) as exc:  # botocore/aiohttp errors reach us as OSError subclasses
            raise StoreUnavailable(key, f"the artifact store {self.url} failed on {key}: "
                                        f"{type(exc).__name__}: {exc}") from None


def open_for_server(url: str | None, data_dir: Path) -> tuple[ArtifactStore | None, ArtifactStore | None]:
    """The artifact stores of a server (--artifact-store `url`, --data-dir `data_dir`): for adapters and for
    vectors; (None, None) without a URL (each store then keeps its files in today's local directory). A remote
    store is checked at once (a probe object written and deleted), so a wrong URL, a missing bucket or bad
    credentials stop start-up with the reason (ValueError), not the first upload. ImportError: fsspec or the
    URL's backend (s3fs) is not installed."""
    if not url:
        return None, None
    try:
        stores = (ArtifactStore(Path(data_dir) / "adapters", f"{url.rstrip('/')}/adapters"),
                  ArtifactStore(Path(data_dir) / "vectors", f"{url.rstrip('/')}/vectors"))
    except ImportError as exc:
        raise ImportError(f"--artifact-store {url}: {exc} (install steerserve[s3] for s3:// URLs)") from None
    try:
        stores[0].probe()
    except ArtifactError as exc:
        raise ValueError(f"--artifact-store {url} cannot be written: {exc}") from None
    return stores


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or any(p in ("", ".", "..") for p in parts) or key.startswith(STAGING):
        raise ValueError(f"invalid artifact key {key!r}")
    return key


def _verify(directory: Path, sums: dict[str, str]) -> str | None:
    """None if every file `sums` names is in `directory` with that sha256; else what is wrong."""
    for name, expected in sorted(sums.items()):
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        actual = sha256_file(path)
        if actual != expected:
            return f"{name} has sha256 {actual[:16]}..., but {expected[:16]}... was recorded when it was stored"
    return None
