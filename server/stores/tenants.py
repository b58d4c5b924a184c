"""Per-tenant settings that only admins change (today: whether conjugate prompting is allowed), persisted through
the repository layer (server/stores/database.py; the profiles' SQLite file by default, or PostgreSQL)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from steerserve.server.http.auth import valid_tenant

from .database import Database, as_database

MIGRATIONS = ("""
CREATE TABLE IF NOT EXISTS tenant_settings (
    tenant          TEXT PRIMARY KEY,
    allow_conjugate INTEGER NOT NULL,
    updated         {real} NOT NULL
)
""",)


class TenantSettings(BaseModel):
    """What an admin has allowed a tenant. Everything defaults to off."""

    model_config = ConfigDict(extra="forbid", strict=True)

    allow_conjugate: bool = False


class TenantSettingsUpdate(BaseModel):
    """A PUT body: the fields given are changed, the others kept."""

    model_config = ConfigDict(extra="forbid", strict=True)

    allow_conjugate: bool | None = None


class TenantStore:
    """Tenant settings keyed by tenant name; thread-safe, durable across restarts, no cache (a change made through
    another replica applies to the next request here). `where`: a Database, or the path of an SQLite file."""

    def __init__(self, where: str | Path | Database):
        self.db, self._owns_db = as_database(where), not isinstance(where, Database)
        self.path = self.db.path
        self.db.migrate("tenants", MIGRATIONS)

    def close(self) -> None:
        if self._owns_db:
            self.db.close()

    def get(self, tenant: str) -> TenantSettings:
        _check(tenant)
        row = self.db.query_one("SELECT allow_conjugate FROM tenant_settings WHERE tenant = ?", (tenant,))
        return TenantSettings(allow_conjugate=bool(row[0])) if row else TenantSettings()

    def update(self, tenant: str, update: TenantSettingsUpdate) -> TenantSettings:
        """Change the fields `update` gives, keep the others; atomic against concurrent updates (other replicas
        included): the read and the write are one transaction under the table's write lock."""
        _check(tenant)
        with self.db.transaction(lock="tenant_settings") as tx:
            row = tx.execute("SELECT allow_conjugate FROM tenant_settings WHERE tenant = ?", (tenant,)).one()
            current = TenantSettings(allow_conjugate=bool(row[0])) if row else TenantSettings()
            new = current.model_copy(update=update.model_dump(exclude_none=True))
            tx.execute("INSERT INTO tenant_settings (tenant, allow_conjugate, updated) VALUES (?, ?, ?) "
                       "ON CONFLICT (tenant) DO UPDATE SET allow_conjugate = excluded.allow_conjugate, "
                       "updated = excluded.updated", (tenant, int(new.allow_conjugate), time.time()))
        return new

    def list(self) -> list[dict[str, Any]]:
        rows = self.db.query("SELECT tenant, allow_conjugate FROM tenant_settings ORDER BY tenant")
        return [{"tenant": t, "allow_conjugate": bool(a)} for t, a in rows]


def _check(tenant: str) -> None:
    if not valid_tenant(tenant):
        raise ValueError(f"invalid tenant {str(tenant)[:80]!r}: use 1-64 of A-Z a-z 0-9 _ . -")
