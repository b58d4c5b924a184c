"""The steering playground (docs/playground.md): one static page and its script, shipped in the package
(server/http/playground/), plus two read-only helpers the page draws with.

- `GET /playground` serves the page and `GET /playground/static/<file>` its script, modules and style, from a
  fixed list (no path is ever read from the request). They need no key: a browser cannot send a bearer token
  when it navigates, and they contain nothing but code. Every call the page then makes goes through the public,
  authenticated API with the key the user types in (kept in memory only): the page gets no powers of its own.
- `GET /playground/api/model`: the served model's shape (layers, query heads, MoE layout, the method families it
  cannot run), which sizes the per-head grid and the expert chart. Authenticated like every API route.
- `GET /playground/api/sinks`: the sink profile `steerserve profile sinks` wrote, if one was put at
  `<data-dir>/sinks.json` (404 otherwise). Authenticated.

Every response of the page and its files carries a strict Content-Security-Policy (`CSP`): scripts, styles,
connections and images from this server only (no inline script or style, and so no eval either: neither
'unsafe-inline' nor 'unsafe-eval' is allowed), no framing, no forms posted
anywhere. The router is included only when `Settings.playground` is on (`--no-playground`: all of this is a 404).
"""
from __future__ import annotations

import json
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

from ..errors import NotFound
from ..state import Caller, State

STATIC_DIR = Path(__file__).resolve().parent.parent / "playground"
# The files the page may load, with their media types; anything else under /playground/static is a 404.
STATIC_FILES = {
    "playground.js": "text/javascript",
    "schema_form.js": "text/javascript",
    "exports.js": "text/javascript",
    "charts.js": "text/javascript",
    "api.js": "text/javascript",
    "playground.css": "text/css",
}
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}
SINKS_FILE = "sinks.json"  # in the data dir: the JSON `steerserve profile sinks --out` writes

router = APIRouter(tags=["playground"])


def _file(name: str, media_type: str) -> Response:
    return Response((STATIC_DIR / name).read_bytes(), media_type=media_type, headers=PAGE_HEADERS)


@router.get("/playground", include_in_schema=False)
async def page() -> Response:
    return _file("index.html", "text/html; charset=utf-8")


@router.get("/playground/static/{name}", include_in_schema=False)
async def static(name: str) -> Response:
    media_type = STATIC_FILES.get(name)
    if media_type is None:
        raise NotFound(f"no playground file '{name}'", param="name")
    return _file(name, media_type + ("; charset=utf-8" if media_type.startswith("text/") else ""))


@router.get("/playground/api/model")
async def model_shape(who: Caller, state: State) -> dict:
    """What the page needs to lay out its controls: the model's layers and heads, its MoE layout, and the
    steering families this model (or its start-up self-tests) cannot serve."""
    eng = state.ready_engine()
    facts = eng.facts
    return {"name": eng.info.name, "max_model_len": eng.info.max_model_len, "num_layers": facts.num_layers,
            "num_heads": facts.num_heads, "num_kv_heads": facts.num_kv_heads, "moe_layers": list(facts.moe_layers),
            "num_experts": facts.num_experts, "experts_top_k": facts.experts_top_k,
            "unsupported": dict(facts.unsupported)}


@router.get("/playground/api/sinks")
async def sink_profile(who: Caller, state: State) -> dict:
    """The sink profile in the data dir, as `steerserve profile sinks` wrote it, or a 404 saying how to make one."""
    path = state.data_dir / SINKS_FILE
    try:
        profile = json.loads(path.read_text())
    except FileNotFoundError:
        raise NotFound(f"no sink profile: run `steerserve profile sinks --out {path}`", param="sinks",
                       code="sink_profile_not_found") from None
    except (OSError, ValueError) as exc:
        raise NotFound(f"the sink profile {path} cannot be read: {exc}", param="sinks",
                       code="sink_profile_not_found") from None
    return profile
