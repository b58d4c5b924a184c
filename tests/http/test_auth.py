"""Authentication and authorization over HTTP: 401 without a valid key (and no key echoed back), tenants see only
their own profiles (404 for another's), global resources and tenant settings are admin-only (403)."""
from __future__ import annotations

import pytest

from tests.http.fake_engine import NAME
from tests.http.test_validation import assert_openai_error

pytestmark = pytest.mark.anyio

CHAT = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
# every route but /health and /ready takes a key (/metrics: tests/http/test_security.py)
KEYED = [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
         ("GET", "/v1/steering/profiles"), ("GET", "/v1/steering/profiles/p"), ("PUT", "/v1/steering/profiles/p"),
         ("DELETE", "/v1/steering/profiles/p"), ("GET", "/v1/adapters"), ("GET", "/v1/adapters/a"),
         ("PUT", "/v1/adapters/a"), ("DELETE", "/v1/adapters/a"), ("GET", "/v1/tenants/alice/settings"),
         ("PUT", "/v1/tenants/alice/settings"), ("GET", "/v1/steering/urial/prefixes"),
         ("GET", "/v1/steering/urial/prefixes/default"), ("PUT", "/v1/steering/urial/prefixes/x"),
         ("DELETE", "/v1/steering/urial/prefixes/x")]


@pytest.mark.parametrize("headers, code", [({}, "missing_api_key"), ({"Authorization": "Bearer sk-wrong"},
                                           "invalid_api_key"), ({"Authorization": "Basic abc"},
                                           "invalid_authorization_header")])
async def test_auth_is_required(served, headers, code):
    async with served.client(None) as client:
        r = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
        assert_openai_error(r, 401, code=code)
        assert "sk-wrong" not in r.text
        for method, path in KEYED:
            r = await client.request(method, path, json={}, headers=headers)
            assert_openai_error(r, 401, code=code)
        assert_openai_error(await client.get("/metrics", headers=headers), 401, code=code)
        for path in ("/health", "/ready", "/v1/steering/schema", "/openapi.json"):
            assert (await client.get(path, headers=headers)).status_code == 200, path


async def test_a_valid_key_is_served(served):
    for who in ("alice", "ops"):
        async with served.client(who) as client:
            r = await client.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 200 and r.json()["model"] == NAME


async def test_profiles_are_tenant_scoped(served):
    spec = {"logits": {"bias": {"7": 2.0}}}
    async with served.client("alice") as alice, served.client("bob") as bob, served.client("ops") as ops:
        assert (await alice.put("/v1/steering/profiles/secret", json=spec)).status_code == 200
        assert (await alice.get("/v1/steering/profiles/secret")).json() == {"name": "secret", "spec": spec}
        r = await bob.get("/v1/steering/profiles/secret")
        assert_openai_error(r, 404, "name", "profile_not_found", named=False)
        r = await bob.delete("/v1/steering/profiles/secret")
        assert_openai_error(r, 404, "name", "profile_not_found", named=False)
        r = await bob.post("/v1/chat/completions", json=CHAT, headers={"X-Steering-Profile": "secret"})
        assert_openai_error(r, 404, "X-Steering-Profile", "profile_not_found", named=False)
        assert "secret" not in [p["name"] for p in (await bob.get("/v1/steering/profiles")).json()["data"]]
        # global profiles: admins write them, everyone reads them
        r = await bob.put("/v1/steering/profiles/house?scope=global", json=spec)
        assert_openai_error(r, 403, "scope", named=False)
        assert (await ops.put("/v1/steering/profiles/house?scope=global", json=spec)).status_code == 200
        assert (await bob.get("/v1/steering/profiles/house")).json()["spec"] == spec
        r = await bob.delete("/v1/steering/profiles/house?scope=global")
        assert_openai_error(r, 403, "scope", named=False)
        r = await bob.get("/v1/steering/profiles/house?scope=everyone")
        assert_openai_error(r, 400, "scope", named=False)
        assert (await ops.delete("/v1/steering/profiles/house?scope=global")).json() == {"name": "house",
                                                                                          "deleted": True}


async def test_tenant_settings_are_admin_managed(served):
    async with served.client("alice") as alice, served.client("ops") as ops:
        assert (await alice.get("/v1/tenants/alice/settings")).json() == {"tenant": "alice", "allow_conjugate": False}
        r = await alice.get("/v1/tenants/bob/settings")
        assert_openai_error(r, 403, "tenant", named=False)
        r = await alice.put("/v1/tenants/alice/settings", json={"allow_conjugate": True})
        assert_openai_error(r, 403,
                            "tenant", named=False)
        assert (await ops.put("/v1/tenants/alice/settings", json={"allow_conjugate": True})).status_code == 200
        assert (await alice.get("/v1/tenants/alice/settings")).json()["allow_conjugate"] is True


async def test_urial_prefixes_are_admin_managed(served):
    async with served.client("alice") as alice, served.client("ops") as ops:
        r = await alice.put("/v1/steering/urial/prefixes/mine", content=b"# Query:\nhi",
                            headers={"content-type": "text/plain"})
        assert_openai_error(r, 403, "name", named=False)
        r = await alice.delete("/v1/steering/urial/prefixes/default")
        assert_openai_error(r, 403, "name", named=False)
        r = await ops.put("/v1/steering/urial/prefixes/mine", content=b"# Query:\nhi",
                          headers={"content-type": "text/plain"})
        assert r.status_code == 200 and r.json()["name"] == "mine" and r.json()["builtin"] is False
        assert (await alice.get("/v1/steering/urial/prefixes/mine")).json()["text"] == "# Query:\nhi"
        r = await ops.put("/v1/steering/urial/prefixes/mine", content=b"\xff", headers={"content-type": "text/plain"})
        assert_openai_error(r, 400, "body", named=False)
        r = await ops.delete("/v1/steering/urial/prefixes/default")
        assert_openai_error(r, 400, "name", named=False)
        assert (await ops.delete("/v1/steering/urial/prefixes/mine")).json() == {"name": "mine", "deleted": True}
        r = await alice.get("/v1/steering/urial/prefixes/mine")
        assert_openai_error(r, 404, "name", "prefix_not_found", named=False)


async def test_adapter_routes_say_adapters_are_off(served):
    async with served.client("alice") as alice:
        for method, path in [("GET", "/v1/adapters"), ("GET", "/v1/adapters/a"), ("DELETE", "/v1/adapters/a")]:
            r = await alice.request(method, path)
            assert_openai_error(r, 400, "model", "adapters_disabled", named=False)
        r = await alice.put("/v1/adapters/a", json={"path": "/tmp"})
        assert_openai_error(r, 400, "model",
                            "adapters_disabled", named=False)
        r = await alice.post("/v1/chat/completions", json={**CHAT, "model": f"{NAME}:mine"})
        assert_openai_error(r, 400, "model", "adapters_disabled", named=False)
