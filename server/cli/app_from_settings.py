"""The server's FastAPI app built from its settings, shared by the single process (`steerserve serve`) and each
Ray Serve replica (server/replicas/deployment.py), so both serve exactly the same app on the same stores."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..settings import Settings


def open_stores(settings: Settings) -> dict:
    """The stores `create_app` takes, on `settings`: one shared database (--database-url) or the SQLite files under
    --data-dir, and the artifact store (--artifact-store) or the local directory for adapter and vector files.
    Raises `DatabaseUnavailable` (an unreachable database), or ValueError / OSError / ImportError / RuntimeError
    (a bad URL, an unwritable store, a missing optional package) with the reason."""
    from ..adapters.registry import AdapterStore
    from ..stores.artifacts import open_for_server
    from ..stores.database import open_database
    from ..stores.prefixes import PrefixStore
    from ..stores.profiles import ProfileStore
    from ..stores.tenants import TenantStore
    from ..stores.vectors import VectorStore

    adapter_files, vector_files = open_for_server(settings.artifact_store, settings.data_dir)
    db = open_database(settings.database_url) if settings.database_url else None
    stores: dict = {
        "profiles": ProfileStore(db or settings.data_dir / "profiles.sqlite3"),
        "adapters": AdapterStore(db or settings.data_dir / "adapters.sqlite3", settings.data_dir / "adapters",
                                 adapter_files),
        # Vector files in the artifact store, their rows beside the others.
        "vectors": VectorStore(db or settings.data_dir / "vectors.sqlite3", settings.data_dir / "vectors",
                               vector_files),
    }
    if db is not None:
        stores.update(tenants=TenantStore(db), prefixes=PrefixStore(db), data_dir=settings.data_dir)
    return stores


def build_app(settings: Settings, model_path: Path, keys, template: str | None,
              on_engine_failure: Callable[[], None], stores: dict | None = None):
    """The app on `settings`: its stores (`open_stores(settings)` unless given), the engine
    (`Engine(settings, model_path)`) built in the background; `on_engine_failure` as in `create_app`."""
    from ..engine.async_engine import Engine
    from ..http.admission import Limits
    from ..http.app import create_app
    from ..http.limits import InputLimits

    stores = dict(open_stores(settings) if stores is None else stores)
    profiles = stores.pop("profiles")
    limits = Limits(settings.max_queued_requests, settings.max_requests_per_tenant, settings.request_timeout)
    return create_app(lambda: Engine(settings, model_path), keys, profiles, on_engine_failure=on_engine_failure,
                      adapter_root=settings.adapter_root, playground=settings.playground,
                      tool_call_parser=settings.tool_call_parser, chat_template=template, limits=limits,
                      input_limits=InputLimits.from_settings(settings), **stores)
