"""Per-tenant settings that only admins change (today: whether conjugate prompting is allowed), in SQLite."""
from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from steerserve.server.http.auth import valid_tenant

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tenant_settings (
    tenant          TEXT PRIMARY KEY,
    allow_conjugate INTEGER NOT NULL,
    updated         REAL NOT NULL
)
"""


class TenantSettings(BaseModel):
    """What an admin has allowed a tenant. Everything defaults to off."""

    model_config = ConfigDict(extra="forbid", strict=True)

    allow_conjugate: bool = False


class TenantSettingsUpdate(BaseModel):
    """A PUT body: the fields given are changed, the others kept."""

    model_config = ConfigDict(extra="forbid", strict=True)

    allow_conjugate: bool | None = None


class TenantStore:
    """Tenant settings keyed by tenant name; thread-safe, durable across restarts (same database as the profiles)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10.0)
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def get(self, tenant: str) -> TenantSettings:
        _check(tenant)
        with self._lock:
            row = self._db.execute("SELECT allow_conjugate FROM tenant_settings WHERE tenant = ?", (tenant,)).fetchone()
        return TenantSettings(allow_conjugate=bool(row[0])) if row else TenantSettings()

    def update(self, tenant: str, update: TenantSettingsUpdate) -> TenantSettings:
        _check(tenant)
        with self._lock:
            row = self._db.execute("SELECT allow_conjugate FROM tenant_settings WHERE tenant = ?", (tenant,)).fetchone()
            current = TenantSettings(allow_conjugate=bool(row[0])) if row else TenantSettings()
            new = current.model_copy(update=update.model_dump(exclude_none=True))
            self._db.execute(
                "INSERT INTO tenant_settings (tenant, allow_conjugate, updated) VALUES (?, ?, ?) "
                "ON CONFLICT (tenant) DO UPDATE SET allow_conjugate = excluded.allow_conjugate, "
                "updated = excluded.updated", (tenant, int(new.allow_conjugate), time.time()))
        return new

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT tenant, allow_conjugate FROM tenant_settings ORDER BY tenant").fetchall()
        return [{"tenant": t, "allow_conjugate": bool(a)} for t, a in rows]


def _check(tenant: str) -> None:
    if not valid_tenant(tenant):
        raise ValueError(f"invalid tenant {str(tenant)[:80]!r}: use 1-64 of A-Z a-z 0-9 _ . -")
