"""Admission over HTTP (in process, a fake engine whose requests wait on a gate): the global and per-tenant bounds
(429 in OpenAI's rate-limit shape with Retry-After), slots released by every way a request ends, the request
deadline (504), the drain on shutdown and a dead engine (503); and the bounds on adapter metric series."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from steerserve.server.http.admission import Limits
from steerserve.server.http.app import create_app
from steerserve.server.http.auth import KeyStore
from steerserve.server.http.metrics import MAX_ADAPTER_LABELS, OTHER, Metrics
from steerserve.server.stores.profiles import ProfileStore
from tests.http.conftest import App, _started
from tests.http.fake_engine import NAME, FakeEngine
from tests.http.test_validation import assert_openai_error

pytestmark = pytest.mark.anyio

CHAT = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@dataclass
class GatedEngine(FakeEngine):
    """Every request waits for `gate` before its first token."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    waiting: int = 0

    async def generate(self, prompt_ids, params, request_id, **kwargs):
        self.waiting += 1
        try:
            await self.gate.wait()
        finally:
            self.waiting -= 1
        async for out in super().generate(prompt_ids, params, request_id, **kwargs):
            yield out


async def start(tmp_path: Path, tokenizer, api_keys, limits: Limits) -> tuple:
    engine = GatedEngine(tokenizer)
    app = create_app(lambda: engine, KeyStore.load(Path(api_keys["file"])), ProfileStore(tmp_path / "p.db"),
                     limits=limits)
    return app, engine


async def until(condition, timeout: float = 10) -> None:
    for _ in range(int(timeout / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise TimeoutError


def assert_rate_limited(r) -> None:
    assert_openai_error(r, 429)
    assert r.json()["error"]["code"] == "rate_limit_exceeded" and r.json()["error"]["type"] == "requests"
    assert 1 <= int(r.headers["retry-after"]) <= 60


async def test_a_tenant_over_its_bound_gets_429_and_another_tenant_is_served(tmp_path, tokenizer, api_keys):
    app, engine = await start(tmp_path, tokenizer, api_keys, Limits(max_queued_requests=100, max_requests_per_tenant=3))
    async with app.router.lifespan_context(app):
        await _started(app)
        served = App(app, engine, api_keys)
        async with served.client("alice") as alice, served.client("bob") as bob:
            held = [asyncio.ensure_future(alice.post("/v1/chat/completions", json={**CHAT, "stream": stream}))
                    for stream in (False, True, False)]
            await until(lambda: engine.waiting == 3)
            r = await alice.post("/v1/chat/completions", json=CHAT)
            assert_rate_limited(r)
            assert "max_requests_per_tenant=3" in r.json()["error"]["message"]
            bobs = asyncio.ensure_future(bob.post("/v1/chat/completions", json=CHAT))
            await until(lambda: engine.waiting == 4)  # bob's request reached the engine while alice is at her bound
            engine.gate.set()
            assert (await bobs).status_code == 200
            assert [(await h).status_code for h in held] == [200] * 3
            state = app.state.steerserve
            await until(lambda: state.admission.total == 0)  # every slot came back
            assert (await alice.post("/v1/chat/completions", json=CHAT)).status_code == 200


async def test_the_global_bound_applies_to_all_tenants_together(tmp_path, tokenizer, api_keys):
    app, engine = await start(tmp_path, tokenizer, api_keys, Limits(max_queued_requests=2, max_requests_per_tenant=2))
    async with app.router.lifespan_context(app):
        await _started(app)
        served = App(app, engine, api_keys)
        async with served.client("alice") as alice, served.client("bob") as bob:
            held = [asyncio.ensure_future(alice.post("/v1/chat/completions", json={**CHAT, "stream": stream}))
                    for stream in (False, True)]
            await until(lambda: engine.waiting == 2)
            r = await bob.post("/v1/chat/completions", json=CHAT)
            assert_rate_limited(r)
            assert "max_queued_requests=2" in r.json()["error"]["message"]
            engine.gate.set()
            assert [(await h).status_code for h in held] == [200, 200]
            assert app.state.steerserve.admission.total == 0  # the streamed response released its slot too
            assert (await bob.post("/v1/chat/completions", json=CHAT)).status_code == 200


async def test_a_request_past_the_deadline_is_aborted_with_504(tmp_path, tokenizer, api_keys):
    app, engine = await start(tmp_path, tokenizer, api_keys, Limits(request_timeout=0.2))
    async with app.router.lifespan_context(app):
        await _started(app)
        async with App(app, engine, api_keys).client("alice") as alice:
            for stream in (False, True):
                r = await alice.post("/v1/chat/completions", json={**CHAT, "stream": stream})
                assert_openai_error(r, 504)
                assert r.json()["error"]["code"] == "request_timeout"
            assert engine.waiting == 0  # the engine requests were cancelled (aborted)
            assert app.state.steerserve.admission.total == 0


async def test_draining_refuses_new_requests_and_readiness(tmp_path, tokenizer, api_keys):
    app, engine = await start(tmp_path, tokenizer, api_keys, Limits())
    async with app.router.lifespan_context(app):
        await _started(app)
        state = app.state.steerserve
        async with App(app, engine, api_keys).client("alice") as alice:
            held = asyncio.ensure_future(alice.post("/v1/chat/completions", json=CHAT))
            await until(lambda: engine.waiting == 1)
            drained = asyncio.ensure_future(state.admission.drain(10))
            await asyncio.sleep(0.01)
            for r in (await alice.post("/v1/chat/completions", json=CHAT), await alice.get("/ready")):
                assert_openai_error(r, 503)
                assert r.json()["error"]["code"] == "shutting_down"
            assert not drained.done()  # the admitted request may still finish
            engine.gate.set()
            assert (await held).status_code == 200
            assert await drained


async def test_a_dead_engine_makes_health_ready_and_requests_503_and_stops_the_server(tmp_path, tokenizer, api_keys):
    stopped = []
    engine = GatedEngine(tokenizer)
    app = create_app(lambda: engine, KeyStore.load(Path(api_keys["file"])), ProfileStore(tmp_path / "p.db"),
                     on_engine_failure=lambda: stopped.append(True))
    async with app.router.lifespan_context(app):
        await _started(app)
        async with App(app, engine, api_keys).client("alice") as alice:
            assert (await alice.get("/health")).status_code == 200
            engine.died = "the engine stopped"
            await until(lambda: stopped == [True])
            for r in (await alice.get("/health"), await alice.get("/ready"),
                      await alice.post("/v1/chat/completions", json=CHAT)):
                assert_openai_error(r, 503)
                assert r.json()["error"]["code"] == "engine_unavailable"


def test_adapter_series_are_capped_and_removed_on_delete():
    metrics = Metrics()
    for i in range(MAX_ADAPTER_LABELS + 10):
        metrics.count_adapter_request(f"a{i}", "tenant", "alice")
    metrics.count_adapter_request("g", "global", "alice")
    metrics.count_adapter_request("g", "global", "bob")
    text = metrics.render().decode()
    names = {line.split('adapter="')[1].split('"')[0] for line in text.splitlines()
             if line.startswith("steerserve_adapter_requests_total{")}
    assert len(names) == MAX_ADAPTER_LABELS + 1 and OTHER in names  # the first 64 names, the rest as one bucket
    assert f'adapter="{OTHER}",scope="global"' in text  # "g" came after the cap: counted, not given a series
    metrics.forget_adapter("a0", "tenant", "alice")
    assert 'adapter="a0"' not in metrics.render().decode()
    metrics.count_adapter_request("new", "tenant", "bob")  # a freed name makes room for a new one
    assert 'adapter="new"' in metrics.render().decode()


def test_lora_requests_info_lists_a_bounded_number_of_names():
    metrics = Metrics()

    class Pool:
        max_loras = 2

        def running_names(self):
            return ["a", "b"]

        def waiting_names(self):
            return [f"w{i}" for i in range(50)]

        def loaded(self):
            return 0

        active = loaded

    metrics.bind_pool(Pool())
    line = next(x for x in metrics.render().decode().splitlines() if x.startswith("vllm:lora_requests_info{"))
    assert 'running_lora_adapters="a,b"' in line and f'waiting_lora_adapters="w0,w1,{OTHER}"' in line
