"""The app's typed state (one `AppState` on `app.state.steerserve`) and the FastAPI dependencies routes reach it by.

Dependencies that can fail (authentication, path checks) run in the order a route declares them and before its
body is validated, so a request is always told the first thing wrong with it in the same order: who it is, then
what it may touch, then its body."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request

from steerserve.server.adapters.pool import AdapterPool
from steerserve.server.adapters.registry import Adapter, AdapterStore, ServedModel, validate_adapter_name
from steerserve.server.frontend.prompt_methods import PrefixStore
from steerserve.server.stores.profiles import GLOBAL, ProfileStore
from steerserve.server.stores.tenants import TenantStore
from steerserve.server.stores.vectors import VectorStore

from ..engine.async_engine import Engine
from .admission import Admission
from .auth import KeyStore, Principal
from .errors import BadRequest, Forbidden, NotFound, Unauthorized, Unavailable
from .limits import InputLimits
from .metrics import Metrics


@dataclass
class AppState:
    """What every route shares: the stores, the metrics, and the engine once it has been built and self-tested."""

    keys: KeyStore
    profiles: ProfileStore
    tenants: TenantStore
    prefixes: PrefixStore
    metrics: Metrics
    vectors: VectorStore  # named control vectors (the `vectors` steering family's store)
    adapters: AdapterStore | None = None  # the adapter registry, served when the engine has LoRA enabled
    adapter_root: Path | None = None  # where users may register adapters by path
    engine: Engine | None = None  # None while loading, or if it failed to start
    error: BaseException | None = None  # why the engine failed to start
    pool: AdapterPool | None = None
    base: ServedModel | None = None  # the base model adapters are checked against
    tool_parser: str | None = None  # vLLM's tool-call parser for chat `tools` (None: requests with tools are a 400)
    admission: Admission = field(default_factory=Admission)  # bounds on generation requests, and the drain
    dead: str | None = None  # why the engine died while serving (the process is exiting); None while it lives
    input_limits: InputLimits = field(default_factory=InputLimits)  # what one request may send
    data_dir: Path | None = None  # the server's --data-dir (files beside the database: the sink profile)

    def ready_engine(self) -> Engine:
        """The engine, or a 503 saying why there is none (yet, or any more)."""
        if self.dead is not None:
            raise Unavailable(f"the engine is unavailable: {self.dead}; the server is restarting",
                              code="engine_unavailable")
        if self.engine is None:
            raise Unavailable("the model is still loading" if self.error is None  # why: /ready, to admins
                              else "the engine failed to start (an admin key on /ready tells why)")
        return self.engine

    def adapter_pool(self) -> AdapterPool:
        """The adapter pool (503 while loading, 400 when this server serves no adapters)."""
        self.ready_engine()
        if self.pool is None or self.adapters is None:
            raise BadRequest("this server does not serve adapters (start it with --enable-lora)", param="model",
                             code="adapters_disabled")
        return self.pool

    def adapter_of(self, who: Principal, name: str) -> Adapter:
        """The adapter a generation request names (its tenant's, else a global one), or a 404 on `model`."""
        self.adapter_pool()
        validate_adapter_name(name, param="model")
        adapter = self.adapters.resolve(who.tenant, name)
        if adapter is None:
            raise NotFound(f"adapter '{name}' not found", param="model", code="adapter_not_found")
        if why := self.adapters.broken(adapter):
            raise BadRequest(f"adapter '{name}' is broken and cannot be served until it is registered again: "
                             f"{why}", param="model", code="adapter_broken")
        return self.adapters.localised(adapter)  # its files' directory on this machine (the artifact cache)


def owner_of(who: Principal, scope: str, writing: bool, what: str = "steering profiles") -> str:
    """The owner a `?scope=` names for `who`: their tenant, or GLOBAL (which only admins write)."""
    if scope not in ("tenant", "global"):
        raise BadRequest("scope must be 'tenant' or 'global'", param="scope")
    if scope == "global" and writing and not who.is_admin:
        raise Forbidden(f"only admins manage global {what}", param="scope")
    return GLOBAL if scope == "global" else who.tenant


async def app_state(request: Request) -> AppState:
    return request.app.state.steerserve


State = Annotated[AppState, Depends(app_state)]


async def principal(request: Request, state: State) -> Principal:
    """Who the request acts as (401 without a valid key; everyone is the default admin in open mode). A key of
    the `metrics` role is a 403 here: it reads /metrics only."""
    who = state.keys.authenticate(request.headers.get("authorization"))
    if who.role == "metrics":
        raise Forbidden("a key of the 'metrics' role may read /metrics only", param="Authorization",
                        code="metrics_key")
    return who


Caller = Annotated[Principal, Depends(principal)]


async def metrics_reader(request: Request, state: State) -> Principal:
    """Who may read /metrics: anyone in open mode (loopback only), else a key of the admin or metrics role
    (401 without a valid key, 403 for a user key): the series name tenants and adapters."""
    who = state.keys.authenticate(request.headers.get("authorization"))
    if not who.reads_metrics:
        raise Forbidden("/metrics needs a key of the 'admin' or 'metrics' role (`steerserve keys add --role "
                        "metrics`)", param="Authorization", code="insufficient_role")
    return who


MetricsReader = Annotated[Principal, Depends(metrics_reader)]


async def maybe_admin(request: Request, state: State) -> bool:
    """True when the request carries a valid admin key (always in open mode); never an error."""
    try:
        return state.keys.authenticate(request.headers.get("authorization")).is_admin
    except Unauthorized:
        return False


IsAdmin = Annotated[bool, Depends(maybe_admin)]


async def ready_engine(state: State) -> Engine:
    return state.ready_engine()


ReadyEngine = Annotated[Engine, Depends(ready_engine)]
