"""Liveness (/health), readiness (/ready: the engine is built, self-tested and healthy) and /metrics."""
from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from ..errors import Unavailable
from ..state import State

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready")
async def ready(state: State) -> dict:
    eng = state.ready_engine()
    try:
        await eng.check_health()
    except Exception as exc:
        raise Unavailable(f"engine unhealthy: {exc}") from None
    return {"status": "ready", "model": eng.info.name}


@router.get("/metrics")
async def prometheus(state: State) -> Response:
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")
