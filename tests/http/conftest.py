"""The app from `create_app` over a fake engine, driven in process through httpx's ASGI transport (no server
process, no model): for the HTTP layer's own behaviour."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from steerserve.server.http.app import create_app
from steerserve.server.http.auth import KeyStore
from steerserve.server.stores.profiles import ProfileStore
from tests.conftest import auth
from tests.http.fake_engine import FakeEngine


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from tests.tiny_models import build_tokenizer

    return AutoTokenizer.from_pretrained(build_tokenizer(tmp_path_factory.mktemp("tokenizer")))


@dataclass
class App:
    app: FastAPI
    engine: FakeEngine
    keys: dict[str, str]

    def client(self, who: str | None = "alice") -> httpx.AsyncClient:
        """A client acting as `who` (a key of `api_keys`: alice, bob, ops), or sending no key (None)."""
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://steerserve.test",
                                 headers=auth(self.keys[who]) if who else {})


async def _started(app: FastAPI) -> None:
    state = app.state.steerserve
    while state.engine is None and state.error is None:
        await asyncio.sleep(0.001)


@pytest.fixture
async def served(tmp_path: Path, tokenizer, api_keys) -> AsyncIterator[App]:
    """The app with API keys (alice and bob: users, ops: admin) over a started fake engine."""
    engine = FakeEngine(tokenizer)
    app = create_app(lambda: engine, KeyStore.load(Path(api_keys["file"])), ProfileStore(tmp_path / "profiles.db"))
    async with app.router.lifespan_context(app):
        await _started(app)
        yield App(app, engine, api_keys)
    assert engine.shut_down


@pytest.fixture
async def alice(served: App) -> AsyncIterator[httpx.AsyncClient]:
    async with served.client("alice") as client:
        yield client
