"""Tenant settings: switches only admins change (e.g. whether a tenant may use conjugate prompting)."""
from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends

from steerserve.server.stores.tenants import TenantSettingsUpdate

from ..auth import Principal, valid_tenant
from ..body import JSONRoute
from ..errors import BadRequest, Forbidden
from ..state import Caller, State

router = APIRouter(route_class=JSONRoute, tags=["tenants"])


def tenant_of(who: Principal, tenant: str, writing: bool) -> str:
    if not valid_tenant(tenant):
        raise BadRequest("invalid tenant name: use 1-64 of A-Z a-z 0-9 _ . -", param="tenant")
    if not who.is_admin and (writing or tenant != who.tenant):
        raise Forbidden("only admins manage tenant settings" if writing else
                        "only admins read other tenants' settings", param="tenant")
    return tenant


async def tenant_to_write(tenant: str, who: Caller) -> str:
    """The path's tenant, checked (as a dependency, so before the body is)."""
    return tenant_of(who, tenant, writing=True)


@router.get("/v1/tenants/{tenant}/settings")
async def get_tenant_settings(tenant: str, who: Caller, state: State) -> dict:
    tenant = tenant_of(who, tenant, writing=False)
    return {"tenant": tenant, **state.tenants.get(tenant).model_dump()}


@router.put("/v1/tenants/{tenant}/settings")
async def put_tenant_settings(owner: Annotated[str, Depends(tenant_to_write)], state: State,
                              body: TenantSettingsUpdate) -> dict:
    updated = await asyncio.to_thread(state.tenants.update, owner, body)  # an SQLite write: off the event loop
    return {"tenant": owner, **updated.model_dump()}
