"""The server's control vector store: list, get (metadata, values or file), put (a GGUF or safetensors file, or
values) and delete named vectors, per tenant or global. Requests then name them in `steering.vectors`."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict

from ._admin import Admin, AsyncAdmin

Scope = Literal["tenant", "global"]
FileFormat = Literal["gguf", "safetensors"]
VectorSource = str | os.PathLike[str] | bytes | Mapping[int, Sequence[float]]
_ROUTE = "/v1/steering/vectors"


class StoredVector(BaseModel):
    """A registered vector. `data` ({layer: values}) is present only when fetched with `values=True`."""

    model_config = ConfigDict(extra="ignore", frozen=True)  # the server may add fields; we read what we know

    name: str
    scope: Scope
    digest: str
    layers: list[int]
    hidden_size: int
    model_hint: str = ""
    updated: float | None = None
    data: dict[int, list[float]] | None = None


def _path(name: str) -> str:
    return f"{_ROUTE}/{quote(name, safe='')}"


def _params(scope: str | None, fmt: str | None = None) -> dict[str, str] | None:
    params = {k: v for k, v in (("scope", scope), ("format", fmt)) if v is not None}
    return params or None


def _upload(source: VectorSource, model_hint: str) -> dict[str, Any]:
    """httpx request arguments for a vector given as a file path, a file's bytes, or {layer: values}."""
    if isinstance(source, Mapping):
        data = {str(int(layer)): [float(x) for x in values] for layer, values in source.items()}
        return {"json": {"data": data, "model_hint": model_hint}}
    content = source if isinstance(source, bytes) else Path(source).read_bytes()
    return {"content": content, "headers": {"Content-Type": "application/octet-stream"}}


class Vectors:
    """`client.vectors`. `scope="global"` addresses the global vectors (admins write them); a tenant's own vector
    shadows a global one of the same name. Another tenant's vector is NotFound (code `vector_not_found`) to you."""

    def __init__(self, admin: Admin):
        self._admin = admin

    def list(self) -> list[StoredVector]:
        """Your tenant's vectors and the global ones, by name."""
        return [StoredVector.model_validate(v) for v in self._admin.call("GET", _ROUTE)["data"]]

    def get(self, name: str, scope: Scope | None = None, *, values: bool = False) -> StoredVector:
        """The vector `name` in `scope` (without one: the one a request naming it would use); with `values=True`
        its directions too."""
        data = self._admin.call("GET", _path(name), params=_params(scope, "json" if values else None))
        return StoredVector.model_validate(data)

    def download(self, name: str, format: FileFormat = "gguf", scope: Scope | None = None) -> bytes:
        """The vector as a file: GGUF (what llama.cpp's --control-vector loads) or safetensors."""
        return self._admin.send("GET", _path(name), params=_params(scope, format)).content

    def put(self, name: str, source: VectorSource, scope: Scope = "tenant", *, model_hint: str = "") -> StoredVector:
        """Register (or replace) a vector: a GGUF or safetensors file (path or bytes), or {0-based layer:
        values}. The server checks it against its model first (InvalidRequest naming the failed check)."""
        response = self._admin.send("PUT", _path(name), params=_params(scope), **_upload(source, model_hint))
        return StoredVector.model_validate(response.json())

    def delete(self, name: str, scope: Scope = "tenant") -> None:
        """Delete; NotFound if there was none in that scope."""
        self._admin.call("DELETE", _path(name), params=_params(scope))


class AsyncVectors:
    """The asyncio counterpart of `Vectors`."""

    def __init__(self, admin: AsyncAdmin):
        self._admin = admin

    async def list(self) -> list[StoredVector]:
        return [StoredVector.model_validate(v) for v in (await self._admin.call("GET", _ROUTE))["data"]]

    async def get(self, name: str, scope: Scope | None = None, *, values: bool = False) -> StoredVector:
        data = await self._admin.call("GET", _path(name), params=_params(scope, "json" if values else None))
        return StoredVector.model_validate(data)

    async def download(self, name: str, format: FileFormat = "gguf", scope: Scope | None = None) -> bytes:
        return (await self._admin.send("GET", _path(name), params=_params(scope, format))).content

    async def put(self, name: str, source: VectorSource, scope: Scope = "tenant", *,
                  model_hint: str = "") -> StoredVector:
        response = await self._admin.send("PUT", _path(name), params=_params(scope), **_upload(source, model_hint))
        return StoredVector.model_validate(response.json())

    async def delete(self, name: str, scope: Scope = "tenant") -> None:
        await self._admin.call("DELETE", _path(name), params=_params(scope))
