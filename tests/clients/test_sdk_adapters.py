"""`client.adapters` and `adapter_model`: offline (what goes on the wire, typed results and errors, through the
mock transport of test_sdk_offline.py) and against the shared server (register by path and by upload, serve a
request through `client.adapters.model(...)`, delete)."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import steerserve_client as sc

from tests.clients.test_sdk_offline import BASE, KEY, MESSAGES, Wire, error
from tests.tiny_models import build_tiny_lora

ADAPTER = {"name": "ahoy", "scope": "tenant", "kind": "lora", "created": 1.5, "source": "upload", "rank": 8,
           "alpha": 16, "target_modules": ["q_proj", "v_proj"], "model": "served:ahoy", "loaded": False,
           "in_flight": 0, "base_model": "x"}


@pytest.fixture()
def wire() -> Wire:
    w = Wire()
    w.reply = lambda r: httpx.Response(200, json={"object": "list", "data": [ADAPTER]} if r.method == "GET" and
                                       r.url.path == "/v1/adapters" else {"name": "ahoy", "deleted": True}
                                       if r.method == "DELETE" else ADAPTER)
    return w


@pytest.fixture()
def client(wire: Wire) -> sc.SteerClient:
    return sc.SteerClient(BASE, KEY, max_retries=0, http_client=httpx.Client(transport=httpx.MockTransport(wire)))


def test_put_list_get_delete_on_the_wire(client, wire):
    a = client.adapters.put("ahoy", "/srv/adapters/ahoy", scope="global")
    assert (wire.last.method, wire.last.url.path, dict(wire.last.url.params)) == (
        "PUT", "/v1/adapters/ahoy", {"scope": "global"})
    assert wire.body() == {"path": "/srv/adapters/ahoy", "kind": "lora"}
    assert wire.last.headers["authorization"] == f"Bearer {KEY}"
    assert isinstance(a, sc.Adapter) and (a.model, a.rank, a.target_modules) == ("served:ahoy", 8, ["q_proj", "v_proj"])
    assert a.base_model == "x"  # a field the SDK does not know is kept
    assert client.adapters.list() == [a] and wire.last.url.path == "/v1/adapters"
    assert client.adapters.get("ahoy") == a and "scope" not in wire.last.url.params
    client.adapters.get("a b", scope="tenant")
    assert wire.last.url.raw_path == b"/v1/adapters/a%20b?scope=tenant"
    assert client.adapters.delete("ahoy") is None and wire.last.method == "DELETE"


def test_upload_sends_the_directorys_files(client, wire, tmp_path):
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (tmp_path / name).write_bytes(name.encode())
    (tmp_path / "README.md").write_text("not sent")
    client.adapters.upload("ahoy", tmp_path)
    assert wire.last.method == "PUT" and wire.last.headers["content-type"].startswith("multipart/form-data")
    body = wire.last.content
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert f'name="{name}"; filename="{name}"'.encode() in body and name.encode() in body
    assert b"not sent" not in body
    sent = len(wire.requests)
    with pytest.raises(FileNotFoundError):
        client.adapters.upload("x", tmp_path / "README.md")
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError):
        client.adapters.upload("x", tmp_path)
    assert len(wire.requests) == sent  # nothing half-sent


def test_adapter_model_names(client, wire):
    assert sc.adapter_model("base", "ahoy") == "base:ahoy"
    for base, adapter in (("base:other", "ahoy"), ("base", "")):
        with pytest.raises(ValueError):
            sc.adapter_model(base, adapter)
    assert client.adapters.model("ahoy") == "served:ahoy"  # the served model, asked once
    assert client.adapters.model("b") == "served:b" and sum(r.url.path == "/v1/models" for r in wire.requests) == 1


def test_a_missing_adapter_is_adapter_not_found(client, wire):
    wire.reply = lambda r: error(404, "name", "adapter 'x' not found", code="adapter_not_found")
    with pytest.raises(sc.AdapterNotFound) as err:
        client.adapters.get("x")
    assert isinstance(err.value, sc.NotFound) and err.value.param == "name"
    wire.reply = lambda r: error(404, "model", "adapter 'x' not found", code="adapter_not_found")
    with pytest.raises(sc.AdapterNotFound):  # a generation naming it too
        client.chat(MESSAGES, model="served:x")
    wire.reply = lambda r: error(400, "model", "no adapters here", code="adapters_disabled")
    with pytest.raises(sc.InvalidRequest):
        client.adapters.list()


def test_async_adapters(wire):
    async def run() -> None:
        http = httpx.AsyncClient(transport=httpx.MockTransport(wire))
        async with sc.AsyncSteerClient(BASE, KEY, max_retries=0, http_client=http) as client:
            assert (await client.adapters.put("ahoy", "/p", kind="iapt")).model == "served:ahoy"
            assert json.loads(wire.last.content) == {"path": "/p", "kind": "iapt"}
            assert [a.name for a in await client.adapters.list()] == ["ahoy"]
            assert await client.adapters.model("ahoy") == "served:ahoy"
            await client.adapters.delete("ahoy", scope="global")
            assert wire.last.method == "DELETE" and wire.last.url.params["scope"] == "global"

    asyncio.run(run())


def test_live_register_upload_serve_delete(server, api_keys, smollm2_path, tmp_path):
    lora = build_tiny_lora(server.adapter_root / "alice" / "sdk-ahoy", smollm2_path, seed=31, rank=8, std=0.05,
                           targets=("q_proj", "v_proj"))
    with sc.SteerClient(server.url, api_keys["alice"], max_retries=0, timeout=300) as client:
        by_path = client.adapters.put("sdk-path", lora)
        uploaded = client.adapters.upload("sdk-upload", lora)
        assert (by_path.source, uploaded.source, uploaded.kind, uploaded.rank) == (str(lora), "upload", "lora", 8)
        assert {"sdk-path", "sdk-upload"} <= {a.name for a in client.adapters.list()}
        model = client.adapters.model("sdk-upload")
        assert model == uploaded.model == f"{client.model}:sdk-upload"
        r = client.chat(MESSAGES, model=model, temperature=0, max_tokens=4)
        assert r.model == model and r.response.usage.completion_tokens > 0
        for name in ("sdk-path", "sdk-upload"):
            client.adapters.delete(name)
            with pytest.raises(sc.AdapterNotFound):
                client.adapters.get(name)
