"""Liveness (/health), readiness (/ready: the engine is built, self-tested and healthy) and /metrics.

/health and /ready take no key (load balancers probe them); /ready's reason for a 503 (an engine's exception
text) is given only to admins. /metrics needs an admin or `metrics` key when keys are configured."""
from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from ..errors import Unavailable
from ..state import IsAdmin, MetricsReader, State

router = APIRouter(tags=["health"])


@router.get("/health")
async def health(state: State) -> dict:
    """Liveness: 200 while the process can serve or is loading; 503 once the engine died (the process exits)."""
    if state.dead is not None:
        raise Unavailable(f"the engine is unavailable: {state.dead}", code="engine_unavailable")
    return {"status": "ok"}


@router.get("/ready")
async def ready(state: State, admin: IsAdmin) -> dict:
    if state.engine is None and state.error is not None:
        raise Unavailable("the engine failed to start" + (f": {state.error}" if admin else ""),
                          code="engine_unavailable")
    eng = state.ready_engine()
    if state.admission.draining:
        raise Unavailable("the server is shutting down", code="shutting_down")
    try:
        await eng.check_health()
    except Exception as exc:
        if reason := eng.dead():  # died a moment ago: the app's watcher is about to notice it too
            raise Unavailable("the engine is unavailable" + (f": {reason}" if admin else ""),
                              code="engine_unavailable") from None
        raise Unavailable("engine unhealthy" + (f": {exc}" if admin else ""), code="engine_unavailable") from None
    return {"status": "ready", "model": eng.info.name}


@router.get("/metrics")
async def prometheus(state: State, _: MetricsReader) -> Response:
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")
