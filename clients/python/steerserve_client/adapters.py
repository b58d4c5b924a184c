"""The adapter registry: list, get, register (by server path, or by uploading the files) and delete LoRA and IAPT
adapters; and `adapter_model`, the `"<base>:<adapter>"` model name a request uses to pick one."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict

from ._admin import Admin, AsyncAdmin

Scope = Literal["tenant", "global"]
Kind = Literal["lora", "iapt"]
_ROUTE = "/v1/adapters"
# The files an adapter directory holds, by kind (what the server accepts as an upload).
UPLOAD_FILES: dict[str, tuple[str, str]] = {"lora": ("adapter_config.json", "adapter_model.safetensors"),
                                            "iapt": ("iapt_config.json", "iapt_model.safetensors")}


def adapter_model(base: str, adapter: str) -> str:
    """The model name that serves `adapter` on top of `base`: `"<base>:<adapter>"`."""
    if not adapter or ":" in base:
        raise ValueError(f"cannot name adapter {adapter!r} on model {base!r}")
    return f"{base}:{adapter}"


class Adapter(BaseModel):
    """A registered adapter, as the server describes it. `model` is the name to put in a request's `model`;
    `loaded`/`in_flight` are the pool's view when it was fetched. Fields the server adds later are kept."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str
    kind: Kind
    scope: Scope
    model: str
    created: float
    source: str  # "upload", or the directory on the server
    loaded: bool = False
    in_flight: int = 0
    rank: int | None = None  # LoRA
    alpha: float | None = None  # LoRA
    target_modules: list[str] | None = None  # LoRA


def _path(name: str) -> str:
    return f"{_ROUTE}/{quote(name, safe='')}"


def _scope(scope: Scope | None) -> dict[str, str] | None:
    return None if scope is None else {"scope": scope}


def _upload(files: str | Path | Iterable[str | Path]) -> list[tuple[str, tuple[str, bytes]]]:
    """The multipart parts of an adapter upload: a directory holding one kind's two files, or those two files
    (FileNotFoundError, before anything is sent, for anything else)."""
    expected = " or ".join(" and ".join(names) for names in UPLOAD_FILES.values())
    if isinstance(files, str | Path) and Path(files).is_dir():
        folder = Path(files)
        kind = next((k for k, names in UPLOAD_FILES.items() if all((folder / n).is_file() for n in names)), None)
        if kind is None:
            raise FileNotFoundError(f"{folder} holds neither {expected}")
        paths = [folder / n for n in UPLOAD_FILES[kind]]
    else:
        paths = [Path(files)] if isinstance(files, str | Path) else [Path(f) for f in files]
        if sorted(p.name for p in paths) not in [sorted(names) for names in UPLOAD_FILES.values()] or \
                not all(p.is_file() for p in paths):
            raise FileNotFoundError(f"an adapter upload is {expected}, got {[str(p) for p in paths]}")
    return [(p.name, (p.name, p.read_bytes())) for p in paths]


class Adapters:
    """`client.adapters`. `scope="global"` addresses the global adapters (admins write them); your tenant's
    adapter shadows a global one of the same name; another tenant's is NotFound to you. The server must run
    with `--enable-lora` (else InvalidRequest, code `adapters_disabled`)."""

    def __init__(self, admin: Admin, base_model: Callable[[], str]):
        self._admin, self._base = admin, base_model

    def list(self) -> list[Adapter]:
        """Your tenant's adapters and the global ones."""
        return [Adapter.model_validate(a) for a in self._admin.call("GET", _ROUTE)["data"]]

    def get(self, name: str, scope: Scope | None = None) -> Adapter:
        """The adapter `name` (without a scope: the one a request naming it would use)."""
        return Adapter.model_validate(self._admin.call("GET", _path(name), params=_scope(scope)))

    def put(self, name: str, path: str | Path, kind: Kind = "lora", scope: Scope = "tenant") -> Adapter:
        """Register (or replace) the adapter in `path`, a directory on the server (users: inside the server's
        `--adapter-root`). The server checks it against its model first (InvalidRequest, `code` naming the
        check)."""
        body = {"path": str(path), "kind": kind}
        return Adapter.model_validate(self._admin.call("PUT", _path(name), params=_scope(scope), json=body))

    def upload(self, name: str, files: str | Path | Iterable[str | Path], scope: Scope = "tenant") -> Adapter:
        """Register (or replace) an adapter by sending its files: a local directory holding them, or the two
        files (adapter_config.json + adapter_model.safetensors, or the IAPT pair). The server keeps the copy."""
        return Adapter.model_validate(self._admin.call("PUT", _path(name), params=_scope(scope),
                                                       files=_upload(files)))

    def delete(self, name: str, scope: Scope = "tenant") -> None:
        """Delete; NotFound if there was none in that scope. Requests already using it finish with it."""
        self._admin.call("DELETE", _path(name), params=_scope(scope))

    def model(self, name: str) -> str:
        """The model name of adapter `name` on the client's model (e.g. `"smollm2-135m-instruct:ahoy"`)."""
        return adapter_model(self._base(), name)


class AsyncAdapters:
    """The asyncio counterpart of `Adapters` (`model` is a coroutine too: it may ask the server its model)."""

    def __init__(self, admin: AsyncAdmin, base_model: Callable[[], Any]):
        self._admin, self._base = admin, base_model

    async def list(self) -> list[Adapter]:
        return [Adapter.model_validate(a) for a in (await self._admin.call("GET", _ROUTE))["data"]]

    async def get(self, name: str, scope: Scope | None = None) -> Adapter:
        return Adapter.model_validate(await self._admin.call("GET", _path(name), params=_scope(scope)))

    async def put(self, name: str, path: str | Path, kind: Kind = "lora", scope: Scope = "tenant") -> Adapter:
        body = {"path": str(path), "kind": kind}
        return Adapter.model_validate(await self._admin.call("PUT", _path(name), params=_scope(scope), json=body))

    async def upload(self, name: str, files: str | Path | Iterable[str | Path], scope: Scope = "tenant") -> Adapter:
        return Adapter.model_validate(await self._admin.call("PUT", _path(name), params=_scope(scope),
                                                             files=_upload(files)))

    async def delete(self, name: str, scope: Scope = "tenant") -> None:
        await self._admin.call("DELETE", _path(name), params=_scope(scope))

    async def model(self, name: str) -> str:
        return adapter_model(await self._base(), name)
