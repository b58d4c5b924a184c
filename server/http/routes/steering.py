"""Steering resources: the spec's JSON schema, stored profiles (per tenant, or global) and URIAL prefixes."""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from steerserve.server.frontend import prompt_methods as prompting
from steerserve.server.frontend import request_steering as steer
from steerserve.server.stores.profiles import validate_name
from steerserve.steering.spec import SteeringSpec

from ..body import JSONRoute, described, model_ref, read_json, require_media_type
from ..errors import BadRequest, Forbidden, NotFound
from ..state import Caller, State, owner_of

router = APIRouter(route_class=JSONRoute, tags=["steering"])

PROFILE_BODY = described({"application/json": {"schema": model_ref(SteeringSpec)}},
                         "A steering spec, checked against the served model as a request's would be.")
PREFIX_BODY = described({"text/plain": {"schema": {"type": "string"}}},
                        "The prefix, UTF-8 text used verbatim (examples in URIAL's format).")


@router.get("/v1/steering/schema")
async def steering_schema() -> dict:
    return SteeringSpec.model_json_schema()


@router.get("/v1/steering/profiles")
async def list_profiles(who: Caller, state: State) -> dict:
    return {"object": "list", "data": state.profiles.list(who.tenant)}


@router.get("/v1/steering/profiles/{name}")
async def get_profile(name: str, who: Caller, state: State, scope: str | None = None) -> dict:
    validate_name(name)
    spec = state.profiles.resolve(who.tenant, name) if scope is None else \
        state.profiles.get(owner_of(who, scope, writing=False), name)
    if spec is None:
        raise NotFound(f"steering profile '{name}' not found", param="name", code="profile_not_found")
    return {"name": name, "spec": spec}


@router.put("/v1/steering/profiles/{name}", openapi_extra=PROFILE_BODY)
async def put_profile(request: Request, name: str, who: Caller, state: State, scope: str = "tenant") -> dict:
    validate_name(name)
    owner = owner_of(who, scope, writing=True)
    require_media_type(request, "application/json")
    body = await read_json(await request.body(), "the profile", state.input_limits)
    spec = steer.validate_profile(body, state.ready_engine().facts, owner, state.vectors)
    await asyncio.to_thread(state.profiles.put, owner, name, spec)  # an SQLite write: off the event loop
    return {"name": name, "scope": scope, "spec": spec}


@router.delete("/v1/steering/profiles/{name}")
async def delete_profile(name: str, who: Caller, state: State, scope: str = "tenant") -> dict:
    validate_name(name)
    if not await asyncio.to_thread(state.profiles.delete, owner_of(who, scope, writing=True), name):
        raise NotFound(f"steering profile '{name}' not found", param="name", code="profile_not_found")
    return {"name": name, "deleted": True}


# --- URIAL prefixes: built-in and registered by admins ---

@router.get("/v1/steering/urial/prefixes")
async def list_prefixes(who: Caller, state: State) -> dict:
    return {"object": "list", "data": state.prefixes.list()}


@router.get("/v1/steering/urial/prefixes/{name}")
async def get_prefix(name: str, who: Caller, state: State) -> dict:
    text = state.prefixes.get(name)
    if text is None:
        raise NotFound(f"URIAL prefix '{name}' not found", param="name", code="prefix_not_found")
    return {**prompting.describe(name, text, builtin=name in prompting.urial.BUILTIN_PREFIXES), "text": text}


@router.put("/v1/steering/urial/prefixes/{name}", openapi_extra=PREFIX_BODY)
async def put_prefix(request: Request, name: str, who: Caller, state: State) -> dict:
    if not who.is_admin:
        raise Forbidden("only admins register URIAL prefixes", param="name")
    require_media_type(request, "text/plain", "application/octet-stream", "")  # a PUT: never sent cross-site
    try:
        return await asyncio.to_thread(state.prefixes.put, name, (await request.body()).decode("utf-8"))
    except UnicodeDecodeError:
        raise BadRequest("the prefix must be UTF-8 text", param="body") from None
    except ValueError as exc:
        raise BadRequest(str(exc), param="name") from None


@router.delete("/v1/steering/urial/prefixes/{name}")
async def delete_prefix(name: str, who: Caller, state: State) -> dict:
    if not who.is_admin:
        raise Forbidden("only admins delete URIAL prefixes", param="name")
    try:
        deleted = state.prefixes.delete(name)
    except ValueError as exc:
        raise BadRequest(str(exc), param="name") from None
    if not deleted:
        raise NotFound(f"URIAL prefix '{name}' not found", param="name", code="prefix_not_found")
    return {"name": name, "deleted": True}
