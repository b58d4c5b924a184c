"""Steering profiles: list, get, put and delete named specs stored on the server (per tenant, or global)."""
from __future__ import annotations

from typing import Any, Literal
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict

from ._admin import Admin, AsyncAdmin
from .steering import Steering

Scope = Literal["tenant", "global"]
_ROUTE = "/v1/steering/profiles"


class Profile(BaseModel):
    """A stored profile. `spec` is the server's JSON as stored; `.steering` parses it into the typed model."""

    model_config = ConfigDict(extra="ignore", frozen=True)  # the server may add fields; we read what we know

    name: str
    spec: dict[str, Any]
    scope: Scope | None = None  # None when fetched without a scope: the one a request would use
    updated: float | None = None

    @property
    def steering(self) -> Steering:
        return Steering.model_validate(self.spec)


def _path(name: str) -> str:
    return f"{_ROUTE}/{quote(name, safe='')}"


def _scope(scope: Scope | None) -> dict[str, str] | None:
    return None if scope is None else {"scope": scope}


def _body(spec: Steering | dict[str, Any]) -> dict[str, Any]:
    return spec.to_json() if isinstance(spec, Steering) else spec


class Profiles:
    """`client.profiles`. `scope="global"` addresses the global profiles (admins write them); a tenant's own
    profile shadows a global one of the same name. Another tenant's profile is ProfileNotFound to you."""

    def __init__(self, admin: Admin):
        self._admin = admin

    def list(self) -> list[Profile]:
        """Your tenant's profiles and the global ones, by name."""
        return [Profile.model_validate(p) for p in self._admin.call("GET", _ROUTE)["data"]]

    def get(self, name: str, scope: Scope | None = None) -> Profile:
        """The profile `name` in `scope`; without a scope, the one a request naming it would use (yours, else the
        global one). ProfileNotFound if there is none."""
        data = self._admin.call("GET", _path(name), params=_scope(scope))
        return Profile(name=data["name"], spec=data["spec"], scope=scope)

    def put(self, name: str, spec: Steering | dict[str, Any], scope: Scope = "tenant") -> Profile:
        """Create or replace. The server validates it on its model first (SteeringError naming the field)."""
        return Profile.model_validate(self._admin.call("PUT", _path(name), params=_scope(scope), json=_body(spec)))

    def delete(self, name: str, scope: Scope = "tenant") -> None:
        """Delete; ProfileNotFound if there was none in that scope."""
        self._admin.call("DELETE", _path(name), params=_scope(scope))


class AsyncProfiles:
    """The asyncio counterpart of `Profiles`."""

    def __init__(self, admin: AsyncAdmin):
        self._admin = admin

    async def list(self) -> list[Profile]:
        return [Profile.model_validate(p) for p in (await self._admin.call("GET", _ROUTE))["data"]]

    async def get(self, name: str, scope: Scope | None = None) -> Profile:
        data = await self._admin.call("GET", _path(name), params=_scope(scope))
        return Profile(name=data["name"], spec=data["spec"], scope=scope)

    async def put(self, name: str, spec: Steering | dict[str, Any], scope: Scope = "tenant") -> Profile:
        data = await self._admin.call("PUT", _path(name), params=_scope(scope), json=_body(spec))
        return Profile.model_validate(data)

    async def delete(self, name: str, scope: Scope = "tenant") -> None:
        await self._admin.call("DELETE", _path(name), params=_scope(scope))
