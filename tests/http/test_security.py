"""Security of the HTTP layer (issue #17, "Security"): /metrics needs an admin or metrics key; open mode answers
only loopback Host names (421); a JSON body needs its content type (415, tests/http/test_validation.py); each
tenant registers adapters by path only in its own directory of --adapter-root, symlinks leaving it refused;
/ready says why it is not ready to admins only."""
from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from steerserve.server.adapters.registry import AdapterStore
from steerserve.server.http.app import create_app
from steerserve.server.http.auth import KeyStore
from steerserve.server.stores.profiles import ProfileStore
from tests.conftest import auth
from tests.http.conftest import _started
from tests.http.fake_engine import NAME, FakeEngine
from tests.http.test_validation import assert_openai_error

pytestmark = pytest.mark.anyio

CHAT = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


def client(app, host: str = "127.0.0.1:8000", key: str | None = None) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=f"http://{host}",
                             headers=auth(key) if key else {})


async def test_metrics_need_an_admin_or_metrics_key(served):
    async with served.client(None) as anonymous, served.client("alice") as alice:
        assert_openai_error(await anonymous.get("/metrics"), 401, code="missing_api_key")
        assert_openai_error(await alice.get("/metrics"), 403, "Authorization", "insufficient_role", named=False)
    for who in ("scraper", "ops"):
        async with served.client(who) as c:
            r = await c.get("/metrics")
            assert r.status_code == 200 and "steerserve_requests_total" in r.text, who
    async with served.client("scraper") as scraper:  # a metrics key reads /metrics and nothing else
        for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/v1/adapters")]:
            r = await scraper.request(method, path, json=CHAT)
            assert_openai_error(r, 403, "Authorization", "metrics_key", named=False)
        for path in ("/health", "/ready", "/docs", "/openapi.json"):  # public: they hold no data
            assert (await scraper.get(path)).status_code == 200, path


@pytest.fixture
async def open_app(tmp_path: Path, tokenizer):
    engine = FakeEngine(tokenizer)
    app = create_app(lambda: engine, KeyStore.open(), ProfileStore(tmp_path / "profiles.db"))
    async with app.router.lifespan_context(app):
        await _started(app)
        yield app, engine


@pytest.mark.parametrize("host", ["127.0.0.1:8000", "localhost", "localhost:8000", "[::1]:8000", "127.3.4.5",
                                  "LOCALHOST.:80"])
async def test_open_mode_answers_loopback_hosts(open_app, host):
    async with client(open_app[0], host) as c:
        assert (await c.get("/metrics")).status_code == 200  # open mode: /metrics stays open (loopback only)
        assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "10.0.0.1",
                                  "[::2]:80", "localhost.evil.example"])
async def test_open_mode_refuses_other_hosts(open_app, host):
    """DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1 sends Host: evil.example."""
    app, engine = open_app
    async with client(app, host) as c:
        for method, path in [("GET", "/health"), ("GET", "/metrics"), ("GET", "/v1/models"),
                             ("POST", "/v1/chat/completions"), ("PUT", "/v1/steering/profiles/p")]:
            r = await c.request(method, path, json=CHAT)
            assert_openai_error(r, 421, "Host", "misdirected_request", named=False)
    assert engine.submitted == []


async def test_hosts_are_not_checked_with_keys(served):
    async with served.client("alice") as alice:
        r = await alice.post("/v1/chat/completions", json=CHAT, headers={"host": "evil.example"})
        assert r.status_code == 200


async def test_ready_tells_why_to_admins_only(served):
    served.engine.healthy = False
    try:
        for who, detailed in [(None, False), ("alice", False), ("scraper", False), ("ops", True)]:
            async with served.client(who) as c:
                r = await c.get("/ready")
                assert_openai_error(r, 503, code="engine_unavailable")
                assert ("the fake engine is down" in r.json()["error"]["message"]) is detailed, who
    finally:
        served.engine.healthy = True


async def test_an_engine_that_failed_to_start_is_explained_to_admins_only(tmp_path, api_keys):
    def broken() -> FakeEngine:
        raise RuntimeError("secret path /srv/models/x is unreadable")

    app = create_app(broken, KeyStore.load(Path(api_keys["file"])), ProfileStore(tmp_path / "p.db"))
    async with app.router.lifespan_context(app):
        await _started(app)
        for who, detailed in [(None, False), ("alice", False), ("ops", True)]:
            async with client(app, key=api_keys[who] if who else None) as c:
                assert ("secret path" in (await c.get("/ready")).text) is detailed, who
        async with client(app, key=api_keys["alice"]) as alice:
            r = await alice.post("/v1/chat/completions", json=CHAT)
            assert_openai_error(r, 503) and "secret path" not in r.text


# --- the adapter root: one directory per tenant ----------------------------------------------------------------

@pytest.fixture
async def adapter_app(tmp_path: Path, tokenizer, api_keys):
    """An app serving adapters over the fake engine (no model: registrations fail their checks with a 400,
    which is past the path checks tested here). `<root>/alice/mine`, `<root>/bob/theirs` hold files."""
    engine = FakeEngine(tokenizer)
    engine.lora = {"max_lora_rank": 8, "max_loras": 2, "max_cpu_loras": 2}
    root = tmp_path / "root"
    for tenant, name in (("alice", "mine"), ("bob", "theirs")):
        (root / tenant / name).mkdir(parents=True)
        for file in ("adapter_config.json", "adapter_model.safetensors"):
            (root / tenant / name / file).write_text("{}")
    store = AdapterStore(tmp_path / "adapters.db", tmp_path / "files")
    app = create_app(lambda: engine, KeyStore.load(Path(api_keys["file"])), ProfileStore(tmp_path / "p.db"),
                     adapters=store, adapter_root=root)
    async with app.router.lifespan_context(app):
        await _started(app)
        yield app, root


async def register(app, who: str, path: Path | str, api_keys) -> httpx.Response:
    async with client(app, key=api_keys[who]) as c:
        return await c.put("/v1/adapters/x", json={"path": str(path)})


async def test_a_tenant_registers_only_inside_its_own_directory(adapter_app, api_keys):
    app, root = adapter_app
    # inside alice's directory: past the path checks (this fake model then fails the adapter's own checks)
    r = await register(app, "alice", root / "alice" / "mine", api_keys)
    assert r.status_code == 400 and r.json()["error"]["code"].startswith("adapter_"), r.text
    for path in (root / "bob" / "theirs", root / "alice" / ".." / "bob" / "theirs", root, root / "bob",
                 "/etc", "/nonexistent/adapter"):
        assert_openai_error(await register(app, "alice", path, api_keys), 403, "path", named=False)
    # an admin may register from anywhere
    r = await register(app, "ops", root / "bob" / "theirs", api_keys)
    assert r.status_code == 400 and r.json()["error"]["code"].startswith("adapter_"), r.text


async def test_symlinks_that_leave_the_tenant_directory_are_refused(adapter_app, api_keys):
    app, root = adapter_app
    os.symlink(root / "bob" / "theirs", root / "alice" / "link")  # the directory is a link to bob's
    assert_openai_error(await register(app, "alice", root / "alice" / "link", api_keys), 403, "path", named=False)
    sneaky = root / "alice" / "sneaky"  # a real directory whose weights link to bob's
    sneaky.mkdir()
    (sneaky / "adapter_config.json").write_text("{}")
    os.symlink(root / "bob" / "theirs" / "adapter_model.safetensors", sneaky / "adapter_model.safetensors")
    r = await register(app, "alice", sneaky, api_keys)
    assert_openai_error(r, 403, "path", named=False)
    assert "adapter_model.safetensors" in r.json()["error"]["message"]
    os.symlink(sneaky / "loop", sneaky / "loop")
    r = await register(app, "alice", sneaky / "loop", api_keys)
    assert r.status_code in (400, 403), r.text


@pytest.mark.parametrize("body", [{"path": "x\u0000y"}, {"path": "a" * 5000}, {"path": "/x", "kind": ["lora"]},
                                  {"path": "/x", "kind": "gguf"}, {"path": 5}, {"path": "~nosuchuser/x"}])
async def test_odd_registration_bodies_are_400s(adapter_app, api_keys, body):
    app, _ = adapter_app
    for who in ("alice", "ops"):
        async with client(app, key=api_keys[who]) as c:
            r = await c.put("/v1/adapters/x", json=body)
            assert r.status_code in (400, 403), (who, r.text)
            assert_openai_error(r, r.status_code)
