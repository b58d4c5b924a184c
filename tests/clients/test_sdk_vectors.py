"""`client.vectors` without a server: the exact requests on the wire (raw file bodies, JSON values, scopes,
formats), what comes back, and the typed errors; then once against the live session server."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import steerserve_client as sc

from tests.clients.test_sdk_offline import BASE, KEY, Wire, error

STORED = {"object": "steering.vector", "name": "joy", "scope": "tenant", "digest": "d" * 32, "layers": [1, 2],
          "hidden_size": 4, "model_hint": "llama", "updated": 2.5}


@pytest.fixture()
def wire() -> Wire:
    return Wire()


@pytest.fixture()
def client(wire: Wire) -> sc.SteerClient:
    return sc.SteerClient(BASE, KEY, model="m", max_retries=0, http_client=httpx.Client(
        transport=httpx.MockTransport(wire)))


def test_vector_calls_on_the_wire(client, wire, tmp_path):
    wire.reply = lambda _: httpx.Response(200, json=STORED)
    path = tmp_path / "joy.gguf"
    path.write_bytes(b"GGUF-bytes")
    v = client.vectors.put("joy", path)
    assert (wire.last.method, wire.last.url.path, dict(wire.last.url.params)) == (
        "PUT", "/v1/steering/vectors/joy", {"scope": "tenant"})
    assert wire.last.content == b"GGUF-bytes" and wire.last.headers["Content-Type"] == "application/octet-stream"
    assert wire.last.headers["Authorization"] == f"Bearer {KEY}"
    assert (v.name, v.layers, v.hidden_size, v.data) == ("joy", [1, 2], 4, None)

    client.vectors.put("joy", b"raw", scope="global")
    assert wire.last.content == b"raw" and dict(wire.last.url.params) == {"scope": "global"}
    client.vectors.put("joy", {1: [0.5, 1, 2, 3]}, model_hint="llama")
    assert json.loads(wire.last.content) == {"data": {"1": [0.5, 1.0, 2.0, 3.0]}, "model_hint": "llama"}

    wire.reply = lambda _: httpx.Response(200, json={**STORED, "data": {"1": [1, 2, 3, 4], "2": [0, 0, 0, 1]}})
    assert client.vectors.get("joy", values=True).data[2] == [0, 0, 0, 1]
    assert dict(wire.last.url.params) == {"format": "json"}
    wire.reply = lambda _: httpx.Response(200, content=b"GGUF...", headers={"content-type": "application/octet-stream"})
    assert client.vectors.download("a b", format="safetensors", scope="global") == b"GGUF..."
    assert wire.last.url.raw_path == b"/v1/steering/vectors/a%20b?scope=global&format=safetensors"
    wire.reply = lambda _: httpx.Response(200, json={"object": "list", "data": [STORED]})
    assert [v.name for v in client.vectors.list()] == ["joy"]
    wire.reply = lambda _: httpx.Response(200, json={"name": "joy", "deleted": True})
    assert client.vectors.delete("joy") is None and wire.last.method == "DELETE"


@pytest.mark.parametrize("response, kind", [
    (error(404, "name", code="vector_not_found"), sc.VectorNotFound),
    (error(400, "file", "the vector fails the 'hidden_size' check", code="invalid_vector"), sc.InvalidRequest),
    (error(403, "scope"), sc.PermissionDenied),
])
def test_vector_errors_are_typed(client, wire, response, kind):
    wire.reply = lambda _: response
    for call in (lambda: client.vectors.get("joy"), lambda: client.vectors.put("joy", b"x"),
                 lambda: client.vectors.download("joy")):
        with pytest.raises(kind):
            call()


def test_async_vectors(wire):
    async def run():
        http = httpx.AsyncClient(transport=httpx.MockTransport(wire))
        client = sc.AsyncSteerClient(BASE, KEY, model="m", max_retries=0, http_client=http)
        wire.reply = lambda _: httpx.Response(200, json=STORED)
        v = await client.vectors.put("joy", b"GGUF")
        got = await client.vectors.get("joy")
        wire.reply = lambda _: httpx.Response(200, content=b"file")
        data = await client.vectors.download("joy")
        wire.reply = lambda _: httpx.Response(200, json={"name": "joy", "deleted": True})
        await client.vectors.delete("joy")
        return v, got, data

    v, got, data = asyncio.run(run())
    assert v == got and data == b"file" and wire.requests[0].content == b"GGUF"


@pytest.mark.slow
def test_vectors_against_the_live_server(server, api_keys):
    import numpy as np

    from steerserve.steering.control_vectors import ControlVector
    from steerserve.steering.vector_files import read_vector, to_bytes

    client = sc.SteerClient(server.url, api_keys["alice"], max_retries=0)
    vector = ControlVector.of({3: np.arange(1, 577, dtype=np.float32)})
    stored = client.vectors.put("sdk-live", to_bytes(vector, "gguf"))
    assert stored.digest == vector.digest() and stored.hidden_size == 576
    assert read_vector(client.vectors.download("sdk-live", format="gguf")).digest() == vector.digest()
    with pytest.raises(sc.InvalidRequest, match="hidden_size"):
        client.vectors.put("sdk-bad", {3: [1.0, 2.0]})
    client.vectors.delete("sdk-live")
    with pytest.raises(sc.VectorNotFound):
        client.vectors.get("sdk-live")
