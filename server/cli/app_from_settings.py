"""The server's FastAPI app built from its settings, shared by the single process (`steerserve serve`) and each
Ray Serve replica (server/replicas/deployment.py), so both serve exactly the same app on the same stores."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..settings import Settings


def build_app(settings: Settings, model_path: Path, keys, template: str | None,
              on_engine_failure: Callable[[], None]):
    """The app on `settings`: the stores in the data directory, the engine (`Engine(settings, model_path)`)
    built in the background; `on_engine_failure` as in `create_app`."""
    from ..adapters.registry import AdapterStore
    from ..engine.async_engine import Engine
    from ..http.admission import Limits
    from ..http.app import create_app
    from ..http.limits import InputLimits
    from ..stores.profiles import ProfileStore

    profiles = ProfileStore(settings.data_dir / "profiles.sqlite3")
    adapters = AdapterStore(settings.data_dir / "adapters.sqlite3", settings.data_dir / "adapters")
    limits = Limits(settings.max_queued_requests, settings.max_requests_per_tenant, settings.request_timeout)
    return create_app(lambda: Engine(settings, model_path), keys, profiles, on_engine_failure=on_engine_failure,
                      adapters=adapters, adapter_root=settings.adapter_root, playground=settings.playground,
                      tool_call_parser=settings.tool_call_parser, chat_template=template, limits=limits,
                      input_limits=InputLimits.from_settings(settings))
