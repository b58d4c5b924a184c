"""The artifact store (server/stores/artifacts.py) and the adapter and vector stores on top of it, each test run
against the local directory and against a real S3 API (moto's server on loopback, through s3fs). "Another
replica" is a second store instance over the same database and store with an empty local cache. Checksums are
checked against hashlib on the original bytes; what a replica reads back against the files that were written."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from steerserve.server.adapters.registry import AdapterStore, ServedModel, inspect_lora
from steerserve.server.http.errors import BadRequest
from steerserve.server.stores.artifacts import (
    ArtifactCorrupt,
    ArtifactMissing,
    ArtifactStore,
    StoreUnavailable,
)
from steerserve.server.stores.vectors import VectorStore
from steerserve.steering.control_vectors import ControlVector
from tests.tiny_models import build_tiny_llama, build_tiny_lora

LORA_FILES = ("adapter_config.json", "adapter_model.safetensors")


class Backend:
    """Store instances over one backend: `replica(n)` is the n-th machine's view (its own cache if remote)."""

    def __init__(self, kind: str, tmp: Path, s3):
        self.kind, self.tmp, self.s3 = kind, tmp, s3
        self.url = s3.url() if kind == "s3" else None

    def replica(self, n: int, section: str = "adapters") -> ArtifactStore:
        if self.url is None:
            return ArtifactStore(self.tmp / "files" / section)  # one directory (as if shared on a mount)
        return ArtifactStore(self.tmp / f"cache{n}" / section, f"{self.url}/{section}", self.s3.options)

    def overwrite(self, key: str, data: bytes, section: str = "adapters") -> None:
        """Replace the stored bytes of `key` behind the store's back (bit rot, a bad copy, a hand edit)."""
        if self.url is None:
            (self.tmp / "files" / section / key).write_bytes(data)
        else:
            self.s3.fs().pipe_file(f"{self.url}/{section}/{key}".removeprefix("s3://"), data)

    def remote_keys(self, section: str = "adapters") -> list[str]:
        if self.url is None:
            root = self.tmp / "files" / section
            return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        root = f"{self.url}/{section}".removeprefix("s3://")
        return sorted(p.removeprefix(root + "/") for p in self.s3.fs().find(root))


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path) -> Backend:
    return Backend(request.param, tmp_path, request.getfixturevalue("s3") if request.param == "s3" else None)


def staged_dir(store: ArtifactStore, files: dict[str, bytes]) -> Path:
    staged = store.staging_dir()
    for name, data in files.items():
        (staged / name).write_bytes(data)
    return staged


FILES = {"a.json": b'{"x": 1}', "b.bin": bytes(range(256)) * 1000}


def test_a_published_artifact_reads_back_verified_on_another_replica(backend):
    one, two = backend.replica(1), backend.replica(2)
    local, sums = one.publish_dir(staged_dir(one, FILES), "abc")
    assert sums == {name: hashlib.sha256(data).hexdigest() for name, data in FILES.items()}
    assert {p.name: p.read_bytes() for p in local.iterdir()} == FILES
    if backend.kind == "s3":
        assert not two.local_path("abc").exists()  # an empty cache: it must come from the store
    fetched = two.fetch_dir("abc", sums)
    assert {p.name: p.read_bytes() for p in fetched.iterdir()} == FILES
    assert backend.remote_keys() == ["abc/a.json", "abc/b.bin"]  # no temporary key left behind
    assert not list((two.local_dir / ".staging").iterdir())


def test_a_corrupt_or_missing_artifact_fails_closed(backend):
    one = backend.replica(1)
    _, sums = one.publish_dir(staged_dir(one, FILES), "abc")
    flipped = bytearray(FILES["b.bin"])
    flipped[1234] ^= 1
    backend.overwrite("abc/b.bin", bytes(flipped))
    if backend.kind == "s3":  # the publisher's cached copy is intact (and checked): it serves on
        assert (one.fetch_dir("abc", sums) / "b.bin").read_bytes() == FILES["b.bin"]
    for replica in ((one,) if backend.kind == "local" else ()) + (backend.replica(2),):
        with pytest.raises(ArtifactCorrupt, match="b.bin has sha256"):
            replica.fetch_dir("abc", sums)
    with pytest.raises(ArtifactMissing):
        backend.replica(3).fetch_dir("nothing", sums)
    one.delete("abc")
    assert backend.remote_keys() == [] and not one.local_path("abc").exists()
    with pytest.raises(ArtifactMissing):
        backend.replica(4).fetch_dir("abc", sums)


def test_a_bad_cached_copy_is_fetched_again(s3, tmp_path):
    backend = Backend("s3", tmp_path, s3)
    one, two = backend.replica(1), backend.replica(2)
    _, sums = one.publish_dir(staged_dir(one, FILES), "abc")
    two.fetch_dir("abc", sums)
    (two.local_path("abc") / "b.bin").write_bytes(b"garbage")  # the cache broke, the store is fine
    assert (two.fetch_dir("abc", sums) / "b.bin").read_bytes() == FILES["b.bin"]


def test_a_remote_write_goes_through_a_temporary_key(s3, tmp_path, monkeypatch):
    """The final key appears only by a move from a temporary one; a failed move leaves neither behind."""
    backend = Backend("s3", tmp_path, s3)
    store = backend.replica(1)
    puts, moves = [], []
    put_file, mv = store._fs.put_file, store._fs.mv
    monkeypatch.setattr(store._fs, "put_file", lambda src, dst, **kw: (puts.append(dst), put_file(src, dst, **kw)))
    monkeypatch.setattr(store._fs, "mv", lambda a, b, **kw: (moves.append((a, b)), mv(a, b, **kw)))
    source = store.temp_file()
    source.write_bytes(b"payload")
    assert store.put_file(source, "v/one.bin") == hashlib.sha256(b"payload").hexdigest()
    (temp,) = puts
    assert moves == [(temp, temp.split(".tmp-")[0])] and temp.split(".tmp-")[0].endswith("v/one.bin")

    def broken_move(*args, **kwargs):
        raise PermissionError("denied")

    monkeypatch.setattr(store._fs, "mv", broken_move)
    source = store.temp_file()
    source.write_bytes(b"other")
    with pytest.raises(StoreUnavailable, match="denied"):
        store.put_file(source, "v/two.bin")
    assert backend.remote_keys() == ["v/one.bin"]


@pytest.fixture(scope="module")
def tiny_lora(tmp_path_factory) -> tuple[Path, ServedModel]:
    tmp = tmp_path_factory.mktemp("tiny")
    model = build_tiny_llama(tmp / "model")
    return build_tiny_lora(tmp / "lora", model, rank=4), ServedModel.from_checkpoint(model, "tiny", 8)


def upload(store: AdapterStore, lora: Path) -> Path:
    staged = store.upload_dir()
    for name in LORA_FILES:
        (staged / name).write_bytes((lora / name).read_bytes())
    return staged


def test_an_adapter_uploaded_on_one_replica_loads_on_another(backend, tiny_lora, tmp_path):
    lora, base = tiny_lora
    one = AdapterStore(tmp_path / "adapters.db", backend.tmp / "cache1", backend.replica(1))
    two = AdapterStore(tmp_path / "adapters.db", backend.tmp / "cache2", backend.replica(2))
    adapter, _ = one.register("alice", "up", "lora", upload(one, lora), base, owned=True)
    assert adapter.meta["sha256"] == {n: hashlib.sha256((lora / n).read_bytes()).hexdigest() for n in LORA_FILES}
    seen = two.resolve("alice", "up")
    path = two.materialise(seen)
    assert path == two.localised(seen).path and {p.name: p.read_bytes() for p in path.iterdir()} == \
        {n: (lora / n).read_bytes() for n in LORA_FILES}
    assert inspect_lora(path, base)["rank"] == 4
    # Corrupt in the store: every replica without a good copy refuses it, naming the adapter.
    backend.overwrite(f"{adapter.meta['artifact']}/adapter_model.safetensors",
                      (lora / "adapter_model.safetensors").read_bytes()[:-1] + b"\x00")
    two.artifacts.evict(adapter.meta["artifact"])
    with pytest.raises(BadRequest) as raised:
        two.materialise(seen)
    assert raised.value.code == "adapter_files_corrupt" and "'up'" in raised.value.message
    assert "sha256" in raised.value.message and raised.value.param == "model"
    # Deleted: gone from the store (and the deleting replica's cache); another replica gets a clear error.
    one.delete("alice", "up")
    one.remove_files(adapter)
    assert backend.remote_keys() == []
    two.artifacts.evict(adapter.meta["artifact"])
    with pytest.raises(BadRequest) as raised:
        two.materialise(seen)
    assert raised.value.code == "adapter_files_missing"


def test_a_path_registration_stores_what_was_validated(backend, tiny_lora, tmp_path):
    """Registered by path: the files are copied into the store, so a file changed or broken at the path later
    changes nothing that is served."""
    lora, base = tiny_lora
    original = tmp_path / "mine"
    original.mkdir()
    for name in LORA_FILES:
        (original / name).write_bytes((lora / name).read_bytes())
    store = AdapterStore(tmp_path / "adapters.db", backend.tmp / "cache1", backend.replica(1))
    adapter, _ = store.register("alice", "mine", "lora", original, base)
    assert adapter.owned and adapter.public()["source"] == str(original) and "artifact" not in adapter.public()
    (original / "adapter_model.safetensors").write_bytes(b"broken later")
    other = AdapterStore(tmp_path / "adapters.db", backend.tmp / "cache2", backend.replica(2))
    path = other.materialise(other.resolve("alice", "mine"))
    assert path != original and (path / "adapter_model.safetensors").read_bytes() == \
        (lora / "adapter_model.safetensors").read_bytes()
    assert other.recheck(base) == {}
    # A path that fails validation leaves nothing in the store or the staging area.
    with pytest.raises(BadRequest):
        store.register("alice", "bad", "lora", original, base)
    assert len(backend.remote_keys()) == 2 and not list((store.files_dir / ".staging").iterdir())


def vector(seed: int) -> ControlVector:
    rng = np.random.default_rng(seed)
    return ControlVector({1: rng.standard_normal(16).astype(np.float32), 3: rng.standard_normal(16).astype(np.float32)},
                         model_hint="tiny")


def test_a_vector_put_on_one_replica_reads_on_another_and_a_corrupt_one_fails_closed(backend, tmp_path):
    one = VectorStore(tmp_path / "v.db", backend.tmp / "c1", backend.replica(1, "vectors"))
    v = vector(0)
    record = one.put("alice", "calm", v)
    two = VectorStore(tmp_path / "v.db", backend.tmp / "c2", backend.replica(2, "vectors"))
    _, read = two.resolve("alice", "calm")
    assert read.layers == v.layers and all(np.array_equal(read.directions[i], v.directions[i]) for i in v.layers)
    assert backend.remote_keys("vectors") == [f"{record.digest}.safetensors"]
    other = vector(1)  # same shape, other values: parses fine, only the digest check can catch it
    temp = tmp_path / "other.safetensors"
    from steerserve.steering.vector_files import write_vector_file

    write_vector_file(other, temp)
    backend.overwrite(f"{record.digest}.safetensors", temp.read_bytes(), "vectors")
    three = VectorStore(tmp_path / "v.db", backend.tmp / "c3", backend.replica(3, "vectors"))
    with pytest.raises(BadRequest) as raised:
        three.resolve("alice", "calm")
    assert raised.value.code == "vector_file_corrupt" and "'calm'" in raised.value.message
    one.delete("alice", "calm")
    assert backend.remote_keys("vectors") == []


def test_without_an_artifact_store_no_fsspec_backend_is_imported(tmp_path):
    """The embedded default opens its stores exactly as `steerserve serve` does and imports neither fsspec nor
    s3fs (nor boto)."""
    code = f"""
import sys
from pathlib import Path
from steerserve.server.cli import serve
from steerserve.server.adapters.registry import AdapterStore
from steerserve.server.stores.artifacts import open_for_server
from steerserve.server.stores.vectors import default_store
from steerserve.server.settings import Settings
settings = Settings.load(data_dir={str(tmp_path)!r})
adapter_files, vector_files = open_for_server(settings.artifact_store, settings.data_dir)
assert adapter_files is None and vector_files is None
AdapterStore(settings.data_dir / "adapters.sqlite3", settings.data_dir / "adapters", adapter_files)
default_store(settings.data_dir, vector_files).put("alice", "v", __import__("tests.server.test_artifact_store",
    fromlist=["vector"]).vector(0))
import steerserve.server.http.app
print(sorted(m for m in ("fsspec", "s3fs", "aiobotocore", "botocore", "boto3") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).parents[2])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    assert (tmp_path / "adapters").is_dir() and len(list((tmp_path / "vectors").glob("*.safetensors"))) == 1


def test_a_store_that_cannot_be_written_stops_start_up_with_the_reason(s3, tmp_path, monkeypatch):
    """`--artifact-store` (here from STEERSERVE_ARTIFACT_STORE, S3 settings from the AWS_* environment as a server
    reads them): a bucket that does not exist is a ValueError naming the URL before anything serves."""
    from steerserve.server.settings import Settings
    from steerserve.server.stores.artifacts import open_for_server

    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("STEERSERVE_ARTIFACT_STORE", "s3://no-such-bucket/steerserve")
    settings = Settings.load()
    with pytest.raises(ValueError, match="s3://no-such-bucket/steerserve cannot be written"):
        open_for_server(settings.artifact_store, tmp_path)
    adapters, vectors = open_for_server(s3.url(), tmp_path)
    assert adapters.remote and vectors.remote and adapters.local_dir == tmp_path / "adapters"


def test_registrations_of_earlier_versions_keep_working(tiny_lora, tmp_path):
    """The default store keeps the earlier layout (`<files>/<32 hex>/`); rows written before the artifact store
    (no `artifact` or `sha256` in their meta: an upload, and a path registration read in place) still serve."""
    lora, base = tiny_lora
    store = AdapterStore(tmp_path / "adapters.db", tmp_path / "files")
    new, _ = store.register("alice", "new", "lora", upload(store, lora), base, owned=True)
    assert new.path.parent == tmp_path / "files" and len(new.path.name) == 32 and new.meta["artifact"] == new.path.name
    old_upload = tmp_path / "files" / ("ab" * 16)
    old_upload.mkdir()
    for name in LORA_FILES:
        (old_upload / name).write_bytes((lora / name).read_bytes())
    uploaded, _ = store._insert("alice", "old-upload", "lora", old_upload, True, inspect_lora(old_upload, base))
    in_place, _ = store._insert("alice", "old-path", "lora", lora, False, inspect_lora(lora, base))
    store.close()
    store = AdapterStore(tmp_path / "adapters.db", tmp_path / "files")  # a restart: its sweep keeps them
    assert store.recheck(base) == {}
    assert store.materialise(uploaded) == old_upload and store.materialise(in_place) == lora
    assert in_place.public()["source"] == str(lora) and uploaded.public()["source"] == "upload"
    store.remove_files(uploaded)
    store.remove_files(in_place)  # not the server's: left alone
    assert not old_upload.exists() and (lora / "adapter_model.safetensors").is_file()
