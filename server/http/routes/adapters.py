"""The adapter registry: list, inspect, register (by path or upload) and delete LoRA and IAPT adapters."""
from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from steerserve.server.adapters.registry import Adapter, AdapterInvalid, validate_adapter_name

from ..auth import Principal
from ..body import JSONRoute, described, model_ref, parse_json
from ..errors import BadRequest, Forbidden, NotFound
from ..state import AppState, Caller, State, owner_of

router = APIRouter(route_class=JSONRoute, tags=["adapters"])

UPLOAD_FILES = {"lora": ("adapter_config.json", "adapter_model.safetensors"),
                "iapt": ("iapt_config.json", "iapt_model.safetensors")}
_EXPECTED = " or ".join(" and ".join(files) for files in UPLOAD_FILES.values())


class PathRegistration(BaseModel):
    """Register an adapter the server can already read (users: only under its --adapter-root)."""

    path: str = Field(description="The adapter's directory on the server.")
    kind: Literal["lora", "iapt"] = "lora"


REGISTRATION_BODY = described(
    {"application/json": {"schema": model_ref(PathRegistration)},
     "multipart/form-data": {"schema": {"type": "object", "description": f"The adapter's files: {_EXPECTED}.",
                                        "additionalProperties": {"type": "string", "format": "binary"}}}},
    "The adapter by path on the server, or uploaded (the kind follows from the files' names).")


def adapter_json(state: AppState, adapter: Adapter) -> dict:
    return {**adapter.public(), "model": f"{state.ready_engine().info.name}:{adapter.name}",
            **state.adapter_pool().status(adapter)}


@router.get("/v1/adapters")
async def list_adapters(who: Caller, state: State) -> dict:
    state.adapter_pool()
    return {"object": "list", "data": [adapter_json(state, a) for a in state.adapters.list(who.tenant)]}


@router.get("/v1/adapters/{name}")
async def get_adapter(name: str, who: Caller, state: State, scope: str | None = None) -> dict:
    state.adapter_pool()
    validate_adapter_name(name)
    adapter = state.adapters.resolve(who.tenant, name) if scope is None else \
        state.adapters.get(owner_of(who, scope, writing=False, what="adapters"), name)
    if adapter is None:
        raise NotFound(f"adapter '{name}' not found", param="name", code="adapter_not_found")
    return adapter_json(state, adapter)


@router.put("/v1/adapters/{name}", openapi_extra=REGISTRATION_BODY)
async def put_adapter(request: Request, name: str, who: Caller, state: State, scope: str = "tenant") -> dict:
    """Register (or replace) an adapter: JSON `{"path": "<dir on the server>", "kind": "lora" | "iapt"}`, or
    a multipart upload of its two files (the kind follows from their names)."""
    validate_adapter_name(name)
    owner = owner_of(who, scope, writing=True, what="adapters")
    pool = state.adapter_pool()
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        kind, path = await _save_upload(request, state.adapters.upload_dir())
        owned = True
    else:
        kind, path, owned = *_path_registration(await request.body(), who, state.adapter_root), False
    try:
        new, old = await asyncio.to_thread(state.adapters.register, owner, name, kind, path, state.base, owned)
    except BaseException:
        if owned:
            shutil.rmtree(path, ignore_errors=True)
        raise
    if old is not None:
        pool.retire(old)
    return adapter_json(state, new)


@router.delete("/v1/adapters/{name}")
async def delete_adapter(name: str, who: Caller, state: State, scope: str = "tenant") -> dict:
    validate_adapter_name(name)
    pool = state.adapter_pool()
    old = state.adapters.delete(owner_of(who, scope, writing=True, what="adapters"), name)
    if old is None:
        raise NotFound(f"adapter '{name}' not found", param="name", code="adapter_not_found")
    pool.retire(old)  # requests already using it finish with it
    return {"name": name, "deleted": True}


async def _save_upload(request: Request, into: Path) -> tuple[str, Path]:
    """The multipart upload's adapter files written into `into` (a fresh directory, removed on failure), and
    the adapter kind their names say."""
    known = {name for files in UPLOAD_FILES.values() for name in files}
    try:
        form = await request.form()
        seen: set[str] = set()
        for field, value in form.multi_items():
            filename = getattr(value, "filename", None)
            if filename is None:
                raise BadRequest(f"form field {field!r} is not a file", param=field)
            target = Path(filename).name if Path(filename).name in known else field
            if target not in known or target in seen:
                raise BadRequest(f"unexpected upload {filename!r}: send {_EXPECTED}", param=field)
            seen.add(target)
            with (into / target).open("wb") as out:
                while chunk := await value.read(1 << 20):
                    out.write(chunk)
        await form.close()
        kinds = [kind for kind, files in UPLOAD_FILES.items() if seen <= set(files)]
        if not kinds:
            raise BadRequest(f"the uploaded files mix adapter kinds: send {_EXPECTED}", param="files")
    except BaseException:
        shutil.rmtree(into, ignore_errors=True)
        raise
    return kinds[0], into


def _path_registration(raw: bytes, who: Principal, adapter_root: Path | None) -> tuple[str, Path]:
    body = parse_json(raw)
    if not isinstance(body, dict) or not isinstance(body.get("path"), str):
        raise BadRequest("expected {\"path\": \"<adapter directory on the server>\", \"kind\": \"lora\" | \"iapt\"} "
                         "or a multipart upload", param="path")
    unknown = sorted(set(body) - {"path", "kind"})
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}", param=unknown[0])
    kind = body.get("kind", "lora")
    path = Path(body["path"]).expanduser().resolve()
    if not who.is_admin:  # a user must not make the server read (or probe) arbitrary paths
        root = adapter_root.resolve() if adapter_root else None
        if root is None or (path != root and root not in path.parents):
            raise Forbidden("users register adapters by path only inside the server's --adapter-root; upload the "
                            "files instead", param="path")
    if not path.is_dir():
        raise AdapterInvalid("files", f"{body['path']} is not a directory on the server")
    return kind, path
