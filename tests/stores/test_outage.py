"""PostgreSQL going away under the stores: requests that need the database get a clear 503 (OpenAI's error shape,
code database_unavailable) for as long as it is down, and work again by themselves once it is back; no stall; a
restart between two requests costs the next one nothing (the cut connection is replaced and the call retried).
A PostgreSQL instance of this test's own is stopped and started again (the session's shared one is left alone)."""
from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from steerserve.server.http.app import create_app
from steerserve.server.http.auth import KeyStore
from steerserve.server.stores import postgres
from steerserve.server.stores.database import open_database
from steerserve.server.stores.prefixes import PrefixStore
from steerserve.server.stores.profiles import ProfileStore
from steerserve.server.stores.tenants import TenantStore
from steerserve.server.stores.vectors import VectorStore
from tests.stores.conftest import pg_data_dir, start_postgres

SPEC = {"vectors": [{"layer": 1, "scale": 2.0, "direction": "calm"}]}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_503_while_postgres_is_down_then_recovers(tmp_path: Path) -> None:
    with pg_data_dir() as pgdata:
        await _outage_over_http(pgdata, tmp_path)


async def _outage_over_http(pgdata: Path, tmp_path: Path) -> None:
    srv = start_postgres(pgdata)
    try:
        db = open_database(srv.get_uri())
        profiles = ProfileStore(db)
        profiles.put("default", "calm", SPEC)  # (a PUT through HTTP validates against a loaded model: not here)
        app = create_app(lambda: None, KeyStore.open(), profiles, tenants=TenantStore(db),
                         prefixes=PrefixStore(db), vectors=VectorStore(db, tmp_path / "vectors"), data_dir=tmp_path)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as http:
            assert (await http.get("/v1/steering/profiles/calm")).json()["spec"] == SPEC

            srv.cleanup()  # PostgreSQL stops (fast shutdown): the open connection is cut
            for _ in range(3):
                started = time.monotonic()
                down = await http.get("/v1/steering/profiles/calm")
                assert time.monotonic() - started < postgres.CONNECT_TIMEOUT_S + 2  # fails fast, no stall
                assert down.status_code == 503, down.text
                error = down.json()["error"]
                assert error["code"] == "database_unavailable" and error["type"] == "service_unavailable"
                assert "database is unavailable" in error["message"]
                time.sleep(postgres.RETRY_AFTER_S)

            srv = start_postgres(pgdata)  # the same data directory: the profile is still there
            deadline = time.monotonic() + 20
            while (up := await http.get("/v1/steering/profiles/calm")).status_code == 503 \
                    and time.monotonic() < deadline:
                time.sleep(0.2)
            assert up.status_code == 200 and up.json()["spec"] == SPEC
            assert (await http.get("/v1/steering/urial/prefixes")).status_code == 200

            srv.cleanup()  # a restart between two requests: the next write finds its connection cut ...
            srv = start_postgres(pgdata)
            r = await http.put("/v1/tenants/default/settings", json={"allow_conjugate": True})
            assert r.status_code == 200 and r.json()["allow_conjugate"] is True  # ... and retries, no 503
    finally:
        srv.cleanup()

