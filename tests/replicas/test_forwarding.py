"""The router-to-replica hop without Ray: `run_asgi` must give exactly what the app gives over a real ASGI
server transport (httpx's), streams included, and a reader that goes away must abort the app's request; the
affinity key; the merged /metrics page, read back with Prometheus's own parser. In process, about 2 s."""
from __future__ import annotations

import asyncio
import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from steerserve.server.replicas.forwarding import ForwardedRequest, ResponseStart, affinity_key, run_asgi
from steerserve.server.replicas.metrics_merge import merge_replica_metrics

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
VOLATILE = {b"x-request-id", b"date"}  # differ between any two requests


def forwarded(method: str, path: str, key: str | None, body: dict | None = None) -> ForwardedRequest:
    headers = [(b"host", b"steerserve.test"), (b"content-type", b"application/json")]
    if key:
        headers.append((b"authorization", f"Bearer {key}".encode()))
    return ForwardedRequest(method, path, b"", headers, json.dumps(body).encode() if body is not None else b"",
                            ("127.0.0.1", 5555))


async def collect(app, request: ForwardedRequest) -> tuple[ResponseStart, list[bytes]]:
    items = [item async for item in run_asgi(app, request)]
    assert isinstance(items[0], ResponseStart) and all(isinstance(i, bytes) for i in items[1:])
    return items[0], items[1:]


@pytest.mark.anyio
@pytest.mark.parametrize("method,path,body,who", [
    ("POST", "/v1/chat/completions", CHAT, "alice"),
    ("POST", "/v1/chat/completions", {**CHAT, "stream": True}, "alice"),
    ("POST", "/v1/chat/completions", {**CHAT, "max_tokens": "many"}, "alice"),  # a 400 naming the field
    ("GET", "/v1/models", None, None),  # a 401
    ("GET", "/ready", None, None),
])
async def test_run_asgi_gives_what_the_app_gives_over_http(served, method, path, body, who):
    key = served.keys[who] if who else None
    start, chunks = await collect(served.app, forwarded(method, path, key, body))
    async with served.client(who) as client:
        direct = await client.request(method, path, json=body)
    assert start.status == direct.status_code
    ours = {k.decode(): v.decode() for k, v in start.headers if k not in VOLATILE}
    theirs = {k: v for k, v in direct.headers.items() if k.encode() not in VOLATILE}
    assert ours == theirs
    got = b"".join(chunks)
    if body and body.get("stream"):  # ids and timestamps differ per request: compare the streamed texts
        def texts(raw: bytes) -> list:
            events = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
            return [json.loads(e)["choices"][0]["delta"].get("content") for e in events[:-1]] + [events[-1]]
        assert texts(got) == texts(direct.content) and len(chunks) > 2  # streamed in pieces, not buffered
    elif start.status == 200 and path != "/ready":
        assert {k: v for k, v in json.loads(got).items() if k not in ("id", "created")} == \
            {k: v for k, v in direct.json().items() if k not in ("id", "created")}
    else:
        assert got == direct.content


@pytest.mark.anyio
async def test_a_reader_going_away_aborts_the_request_in_the_app(served):
    """Closing the stream early (the router's client left) is a client disconnect to the app: the generation
    stops (the fake engine is asked for no more tokens) and the app's request ends within the grace time."""
    steps, closed = [], []
    generate = served.engine.generate

    async def counted(*args, **kwargs):
        try:
            async for out in generate(*args, **kwargs):
                steps.append(1)
                yield out
        finally:
            closed.append(len(steps))

    served.engine.generate = counted
    body = {**CHAT, "max_tokens": 1000, "stream": True}
    stream = run_asgi(served.app, forwarded("POST", "/v1/chat/completions", served.keys["alice"], body))
    start = await stream.__anext__()
    assert start.status == 200
    await stream.__anext__()
    await asyncio.wait_for(stream.aclose(), 10)
    assert served.app.state.steerserve.admission.total == 0
    for _ in range(100):
        if closed:
            break
        await asyncio.sleep(0.05)
    assert closed and closed[0] < 1000, (closed, len(steps))  # the generation was stopped, not run to the end


def test_affinity_key_names_the_tenant_and_adapter():
    tenants = {"Bearer a": "alice", "Bearer b": "bob"}.get
    def key(body, auth_header="Bearer a", path="/v1/chat/completions", method="POST"):
        headers = [(b"authorization", auth_header.encode())] if auth_header else []
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return affinity_key(ForwardedRequest(method, path, b"", headers, raw), tenants)

    alice_r0 = key({"model": "base:r0"})
    assert alice_r0.startswith("adapter-") and alice_r0 == key({"model": "base:r0", "max_tokens": 3})
    assert alice_r0 == key({"model": "base:r0"}, path="/v1/completions")
    assert len({alice_r0, key({"model": "base:r1"}), key({"model": "base:r0"}, "Bearer b")}) == 3
    for no_affinity in (key({"model": "base"}), key({"model": "base:r0"}, "Bearer nobody"),
                        key({"model": "base:r0"}, None), key(b"not json"), key([1, 2]), key({"model": 7}),
                        key({"model": "base:r0"}, path="/v1/profiles/x"),
                        key({"model": "base:r0"}, method="GET")):
        assert no_affinity == ""


def test_merged_metrics_label_every_sample_with_its_replica():
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    pages = {}
    for replica, n in (("r-a", 3), ("r-b", 5)):
        registry = CollectorRegistry()
        Counter("steerserve_requests", "Requests", ["route"], registry=registry).labels("/v1/x").inc(n)
        Gauge("steerserve_adapters_resident", "Resident", registry=registry).set(n + 1)
        Histogram("steerserve_latency_seconds", "Latency", buckets=(1.0,), registry=registry).observe(0.5 * n)
        pages[replica] = generate_latest(registry).decode()
    merged = merge_replica_metrics(pages).decode()
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    by_replica = {(s.name, s.labels["replica"]): s.value for f in families.values() for s in f.samples
                  if not s.name.endswith("_created") and "le" not in s.labels}
    assert by_replica[("steerserve_requests_total", "r-a")] == 3
    assert by_replica[("steerserve_requests_total", "r-b")] == 5
    assert by_replica[("steerserve_adapters_resident", "r-b")] == 6
    assert by_replica[("steerserve_latency_seconds_sum", "r-b")] == 2.5
    assert families["steerserve_requests"].type == "counter"
    assert merged.count("# TYPE steerserve_requests_total counter") == 1  # one family, both replicas' samples
    assert all(s.labels.get("route") == "/v1/x" for s in families["steerserve_requests"].samples)
