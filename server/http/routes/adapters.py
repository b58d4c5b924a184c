"""The adapter registry: list, inspect, register (by path or upload) and delete LoRA and IAPT adapters."""
from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from steerserve.server.adapters.registry import Adapter, AdapterInvalid, validate_adapter_name

from ..auth import Principal
from ..body import JSONRoute, described, model_ref, read_json, require_media_type
from ..errors import BadRequest, Forbidden, NotFound
from ..limits import media_type
from ..state import AppState, Caller, State, owner_of

router = APIRouter(route_class=JSONRoute, tags=["adapters"])

UPLOAD_FILES = {"lora": ("adapter_config.json", "adapter_model.safetensors"),
                "iapt": ("iapt_config.json", "iapt_model.safetensors")}
_EXPECTED = " or ".join(" and ".join(files) for files in UPLOAD_FILES.values())


class PathRegistration(BaseModel):
    """Register an adapter the server can already read (users: only under `<--adapter-root>/<their tenant>/`)."""

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
    require_media_type(request, "application/json", "multipart/form-data")
    if media_type(request.headers) == "multipart/form-data":
        kind, path = await _save_upload(request, state.adapters.upload_dir())
        owned = True
    else:
        body = await read_json(await request.body(), limits=state.input_limits)
        kind, path, owned = *_path_registration(body, who, state.adapter_root), False
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
    old = await asyncio.to_thread(state.adapters.delete, owner_of(who, scope, writing=True, what="adapters"), name)
    if old is None:
        raise NotFound(f"adapter '{name}' not found", param="name", code="adapter_not_found")
    pool.retire(old)  # requests already using it finish with it
    return {"name": name, "deleted": True}


async def _save_upload(request: Request, into: Path) -> tuple[str, Path]:
    """The multipart upload's adapter files written into `into` (a fresh directory, removed on failure), and
    the adapter kind their names say."""
    known = {name for files in UPLOAD_FILES.values() for name in files}
    try:
        try:
            form = await request.form()
        except StarletteHTTPException as exc:  # starlette's parser: a body that is not multipart
            raise BadRequest(f"the upload is not valid multipart/form-data: {exc.detail}", param="files",
                             code="invalid_upload") from None
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


def _path_registration(body: object, who: Principal, adapter_root: Path | None) -> tuple[str, Path]:
    """The kind and resolved directory of a registration by path. A user's must lie inside their own tenant's
    directory `<adapter_root>/<tenant>/`, after following every symlink (the directory's and its files'), so no
    tenant can register another's adapter or make the server read anything else."""
    if not isinstance(body, dict) or not isinstance(body.get("path"), str):
        raise BadRequest("expected {\"path\": \"<adapter directory on the server>\", \"kind\": \"lora\" | \"iapt\"} "
                         "or a multipart upload", param="path")
    unknown = sorted(set(body) - {"path", "kind"})
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}", param=unknown[0])
    kind = body.get("kind", "lora")
    if not isinstance(kind, str) or kind not in UPLOAD_FILES:
        raise BadRequest(f"kind must be one of {sorted(UPLOAD_FILES)}, got {str(kind)[:40]!r}", param="kind",
                         code="invalid_value")
    try:
        path = Path(body["path"]).expanduser().resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # a NUL byte, a symlink loop, an unknown ~user
        raise BadRequest(f"path cannot be resolved on the server: {exc}", param="path") from None
    if not who.is_admin:  # a user must not make the server read (or probe) arbitrary paths
        root = (adapter_root / who.tenant).resolve() if adapter_root else None
        if root is None or not _inside(path, root):
            raise Forbidden(f"users register adapters by path only inside their tenant's directory of the server's "
                            f"--adapter-root (<adapter-root>/{who.tenant}/...); upload the files instead",
                            param="path")
        try:
            leaving = [f for f in UPLOAD_FILES[kind] if (path / f).exists() and not _inside((path / f).resolve(), root)]
        except (OSError, RuntimeError) as exc:
            raise BadRequest(f"path cannot be read on the server: {exc.strerror if isinstance(exc, OSError) else exc}",
                             param="path") from None
        if leaving:
            raise Forbidden(f"{leaving[0]} is a link that leaves <adapter-root>/{who.tenant}/", param="path")
    try:
        is_dir = path.is_dir()
    except OSError:  # e.g. a name too long
        is_dir = False
    if not is_dir:
        raise AdapterInvalid("files", f"{body['path'][:200]} is not a directory on the server")
    return kind, path


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents
