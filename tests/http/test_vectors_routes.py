"""The control vector store over HTTP (in process, fake engine with a 2-layer, 8-wide model): uploads in every
form, downloads as files llama.cpp and safetensors read, the checks against the served model as 400s naming the
check, tenant scoping exactly like profiles, the upload bound, and registrations surviving a restart."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
from safetensors.numpy import save

from steerserve.server.http.app import create_app
from steerserve.server.http.auth import KeyStore
from steerserve.server.http.routes import vectors as vector_routes
from steerserve.server.stores.profiles import ProfileStore
from steerserve.steering.control_vectors import ControlVector
from steerserve.steering.vector_files import read_vector, to_bytes
from tests.conftest import auth
from tests.http.conftest import _started
from tests.http.fake_engine import FakeEngine
from tests.http.test_validation import assert_openai_error

pytestmark = pytest.mark.anyio

HIDDEN, LAYERS = 8, 2
ROUTE = "/v1/steering/vectors"


def with_hidden_size(facts, hidden: int):
    """The fake engine's facts with a hidden size, where the vectors method keeps it."""
    return replace(facts, extra={**facts.extra, "vectors": {"hidden_size": hidden}})


def vector(layers=(1,), seed=0, hint="llama") -> ControlVector:
    rng = np.random.default_rng(seed)
    return ControlVector.of({layer: rng.standard_normal(HIDDEN) for layer in layers}, hint)


def raw(data: bytes) -> dict:
    return {"content": data, "headers": {"Content-Type": "application/octet-stream"}}


@pytest.fixture
async def app(tmp_path: Path, tokenizer, api_keys):
    engine = FakeEngine(tokenizer)
    engine.facts = with_hidden_size(engine.facts, HIDDEN)
    app = create_app(lambda: engine, KeyStore.load(Path(api_keys["file"])), ProfileStore(tmp_path / "profiles.db"))
    async with app.router.lifespan_context(app):
        await _started(app)
        yield app


def client(app, key: str | None) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://steerserve.test",
                             headers=auth(key) if key else {})


async def test_upload_forms_and_downloads(app, api_keys):
    v = vector((1,), hint="llama")
    async with client(app, api_keys["alice"]) as c:
        r = await c.put(f"{ROUTE}/calm", **raw(to_bytes(v, "gguf")))
        assert r.status_code == 200, r.text
        assert r.json() | {"updated": 0} == {"object": "steering.vector", "name": "calm", "scope": "tenant",
                                             "digest": v.digest(), "layers": [1], "hidden_size": HIDDEN,
                                             "model_hint": "llama", "updated": 0}
        # multipart, safetensors with layer 0 (which GGUF cannot hold)
        w = vector((0, 1), seed=1)
        r = await c.put(f"{ROUTE}/early", files={"file": ("early.safetensors", to_bytes(w, "safetensors"))})
        assert r.status_code == 200 and r.json()["layers"] == [0, 1], r.text
        # JSON values
        r = await c.put(f"{ROUTE}/inline", json={"data": {"1": [0.5] * HIDDEN}, "model_hint": "x"})
        assert r.status_code == 200 and r.json()["digest"] == ControlVector.of({1: [0.5] * HIDDEN}).digest()

        assert [x["name"] for x in (await c.get(ROUTE)).json()["data"]] == ["calm", "early", "inline"]
        r = await c.get(f"{ROUTE}/calm", params={"format": "gguf"})
        assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
        assert read_vector(r.content).digest() == v.digest()
        r = await c.get(f"{ROUTE}/early", params={"format": "safetensors"})
        assert read_vector(r.content).digest() == w.digest()
        r = await c.get(f"{ROUTE}/early", params={"format": "json"})
        np.testing.assert_array_equal(np.float32(r.json()["data"]["0"]), w.directions[0])
        assert_openai_error(await c.get(f"{ROUTE}/early", params={"format": "gguf"}), 400, param="format",
                            named=False)
        assert_openai_error(await c.get(f"{ROUTE}/calm", params={"format": "npz"}), 400, param="format")
        assert (await c.delete(f"{ROUTE}/calm")).json() == {"name": "calm", "deleted": True}
        assert_openai_error(await c.get(f"{ROUTE}/calm"), 404, param="name", named=False, code="vector_not_found")
        assert_openai_error(await c.delete(f"{ROUTE}/calm"), 404, code="vector_not_found")


def nan_vector() -> bytes:
    d = np.ones(HIDDEN, np.float32)
    d[2] = np.nan
    return save({"direction.1": d})


@pytest.mark.parametrize("body, check", [
    (lambda: raw(to_bytes(ControlVector.of({1: np.ones(HIDDEN + 1)}), "gguf")), "hidden_size"),
    (lambda: raw(to_bytes(ControlVector.of({LAYERS: np.ones(HIDDEN)}), "gguf")), "layers"),
    (lambda: raw(nan_vector()), "finite"),
    (lambda: raw(save({"direction.1": np.zeros(HIDDEN, np.float32)})), "empty"),
    (lambda: raw(b"GGUF but not really"), "format"),
    (lambda: raw(b"\x00" * 64), "format"),
    (lambda: raw(b""), None),
    (lambda: {"files": {"other": ("x", b"GGUF")}}, None),
])
async def test_a_vector_that_does_not_fit_the_model_is_a_400_naming_the_check(app, api_keys, body, check):
    async with client(app, api_keys["alice"]) as c:
        r = await c.put(f"{ROUTE}/bad", **body())
        assert_openai_error(r, 400, param="file", named=False, code="invalid_vector")
        if check is not None:
            assert f"'{check}' check" in r.json()["error"]["message"], r.json()
        assert (await c.get(ROUTE)).json()["data"] == []


@pytest.mark.parametrize("body, param", [
    ({"data": {"1": [1.0] * (HIDDEN - 1)}}, "file"),  # wrong size: the model check
    ({"data": {"one": [1.0] * HIDDEN}}, "data.one"),
    ({"data": {"1": [1.0, "x"]}}, "data.1"),
    ({"data": {"1": [1.0] * HIDDEN}, "scale": 2}, "scale"),
    ({"values": {}}, "data"),
])
async def test_json_uploads_name_the_field(app, api_keys, body, param):
    async with client(app, api_keys["alice"]) as c:
        assert_openai_error(await c.put(f"{ROUTE}/bad", json=body), 400, param=param, named=False)


async def test_tenants_are_scoped_like_profiles(app, api_keys):
    mine, shared = vector(seed=1), vector(seed=2)
    async with client(app, api_keys["alice"]) as alice, client(app, api_keys["bob"]) as bob, \
            client(app, api_keys["ops"]) as ops:
        assert (await alice.put(f"{ROUTE}/calm", **raw(to_bytes(mine, "gguf")))).status_code == 200
        assert_openai_error(await bob.get(f"{ROUTE}/calm"), 404, code="vector_not_found")
        assert_openai_error(await bob.delete(f"{ROUTE}/calm"), 404, code="vector_not_found")
        assert (await bob.get(ROUTE)).json()["data"] == []
        assert_openai_error(await alice.put(f"{ROUTE}/calm", params={"scope": "global"},
                                            **raw(to_bytes(shared, "gguf"))), 403, param="scope", named=False)
        r = await ops.put(f"{ROUTE}/calm", params={"scope": "global"}, **raw(to_bytes(shared, "gguf")))
        assert r.status_code == 200 and r.json()["scope"] == "global"
        assert (await bob.get(f"{ROUTE}/calm")).json()["digest"] == shared.digest()  # the global one
        assert (await alice.get(f"{ROUTE}/calm")).json()["digest"] == mine.digest()  # her own shadows it
        r = await alice.get(f"{ROUTE}/calm", params={"scope": "global"})
        assert r.json()["digest"] == shared.digest()
        assert [(x["name"], x["scope"]) for x in (await alice.get(ROUTE)).json()["data"]] == [
            ("calm", "tenant"), ("calm", "global")]
        assert_openai_error(await bob.delete(f"{ROUTE}/calm", params={"scope": "global"}), 403, param="scope",
                            named=False)
        assert_openai_error(await alice.get(f"{ROUTE}/calm", params={"scope": "everyone"}), 400, param="scope")
        assert_openai_error(await alice.put(f"{ROUTE}/bad name!", **raw(to_bytes(mine, "gguf"))), 400,
                            param="name")
    async with client(app, None) as anonymous:
        assert_openai_error(await anonymous.get(ROUTE), 401)


async def test_uploads_are_bounded(app, api_keys, monkeypatch):
    monkeypatch.setattr(vector_routes, "MAX_VECTOR_UPLOAD_BYTES", 1000)
    big = to_bytes(ControlVector.of({1: np.ones(HIDDEN)}), "gguf") + b"\x00" * 1000

    async def chunked():
        for i in range(0, len(big), 100):
            yield big[i:i + 100]

    async with client(app, api_keys["alice"]) as c:
        for r in (await c.put(f"{ROUTE}/big", **raw(big)),  # refused on its Content-Length
                  await c.put(f"{ROUTE}/big", content=chunked(),  # refused while reading: no length given
                              headers={"Content-Type": "application/octet-stream"}),
                  await c.put(f"{ROUTE}/big", files={"file": ("v.gguf", big)})):
            assert r.status_code == 413, r.text
            assert r.json()["error"]["param"] == "file" and r.json()["error"]["code"] == "upload_too_large"
        r = await c.put(f"{ROUTE}/big", content=b"GGUF", headers={"Content-Type": "text/plain"})
        assert r.status_code == 415 and r.json()["error"]["param"] == "content-type"
        assert (await c.get(ROUTE)).json()["data"] == []


async def test_registrations_survive_a_restart_and_share_files(tmp_path, tokenizer, api_keys):
    keys = KeyStore.load(Path(api_keys["file"]))
    v = vector((1,), seed=3)

    async def serve():
        engine = FakeEngine(tokenizer)
        engine.facts = with_hidden_size(engine.facts, HIDDEN)
        return create_app(lambda: engine, keys, ProfileStore(tmp_path / "profiles.db"))

    first = await serve()
    async with first.router.lifespan_context(first):
        await _started(first)
        async with client(first, api_keys["alice"]) as c:
            for name in ("a", "b"):
                assert (await c.put(f"{ROUTE}/{name}", **raw(to_bytes(v, "gguf")))).status_code == 200
    assert len(list((tmp_path / "vectors").glob("*.safetensors"))) == 1  # equal content, one file
    second = await serve()
    async with second.router.lifespan_context(second):
        await _started(second)
        async with client(second, api_keys["alice"]) as c:
            r = await c.get(f"{ROUTE}/a", params={"format": "safetensors"})
            assert read_vector(r.content).digest() == v.digest()
            await c.delete(f"{ROUTE}/a")
            assert len(list((tmp_path / "vectors").glob("*.safetensors"))) == 1  # still used by b
            await c.delete(f"{ROUTE}/b")
            assert list((tmp_path / "vectors").glob("*.safetensors")) == []
