"""Named steering profiles per tenant (plus admin-managed global ones), persisted through the repository layer
(server/stores/database.py: an SQLite file by default, or PostgreSQL)."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from steerserve.server.http.errors import BadRequest

from .database import Database, as_database

GLOBAL = "*"  # pseudo-tenant of global profiles; no real tenant can be named this (see auth's tenant pattern)
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")

MIGRATIONS = ("""
CREATE TABLE IF NOT EXISTS profiles (
    tenant  TEXT NOT NULL,
    name    TEXT NOT NULL,
    spec    TEXT NOT NULL,  -- JSON object
    updated {real} NOT NULL,  -- unix seconds
    PRIMARY KEY (tenant, name)
)
""",)


def validate_name(name: object) -> str:
    """The profile name if it matches [A-Za-z0-9_.-]{1,64}; BadRequest(param="name") otherwise."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise BadRequest(f"invalid profile name {str(name)[:80]!r}: use 1-64 of A-Z a-z 0-9 _ . -",
                         param="name", code="invalid_value")
    return name


def _check_tenant(tenant: str) -> None:
    # Tenants come from authentication, not from clients: a bad one is a bug, hence ValueError, not BadRequest.
    if tenant != GLOBAL and not (isinstance(tenant, str) and _NAME_RE.fullmatch(tenant)):
        raise ValueError(f"invalid tenant {tenant!r}")


class ProfileStore:
    """Profiles keyed by (tenant, name); thread-safe, durable across restarts, no cache (every read goes to the
    database, so what another replica wrote is seen). `where`: a Database, or the path of an SQLite file."""

    def __init__(self, where: str | Path | Database):
        self.db, self._owns_db = as_database(where), not isinstance(where, Database)
        self.path = self.db.path  # the SQLite file (None on PostgreSQL)
        self.db.migrate("profiles", MIGRATIONS)

    def close(self) -> None:
        """Close the database if this store opened it (a Database passed in belongs to the caller)."""
        if self._owns_db:
            self.db.close()

    def __enter__(self) -> ProfileStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ProfileStore({self.db!r})"

    def put(self, tenant: str, name: str, spec: dict[str, Any]) -> None:
        """Create or replace the profile `name` in `tenant`'s scope (GLOBAL for global ones)."""
        _check_tenant(tenant)
        validate_name(name)
        if not isinstance(spec, dict):
            raise TypeError(f"profile spec must be a dict, got {type(spec).__name__}")
        text = json.dumps(spec, allow_nan=False)  # strict JSON: NaN would not round-trip through clients
        self.db.execute("INSERT INTO profiles (tenant, name, spec, updated) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT (tenant, name) DO UPDATE SET spec = excluded.spec, updated = excluded.updated",
                        (tenant, name, text, time.time()))

    def get(self, tenant: str, name: str) -> dict[str, Any] | None:
        """The profile in exactly `tenant`'s scope (no global fallback), or None."""
        _check_tenant(tenant)
        validate_name(name)
        row = self.db.query_one("SELECT spec FROM profiles WHERE tenant = ? AND name = ?", (tenant, name))
        return json.loads(row[0]) if row else None

    def resolve(self, tenant: str, name: str) -> dict[str, Any] | None:
        """The profile a request of `tenant` means by `name`: its own if any, else the global one, else None."""
        _check_tenant(tenant)
        validate_name(name)
        row = self.db.query_one(
            "SELECT spec FROM profiles WHERE name = ? AND tenant IN (?, ?) ORDER BY tenant = ? LIMIT 1",
            (name, tenant, GLOBAL, GLOBAL))
        return json.loads(row[0]) if row else None

    def delete(self, tenant: str, name: str) -> bool:
        """Delete the profile in exactly `tenant`'s scope; False if there was none."""
        _check_tenant(tenant)
        validate_name(name)
        cur = self.db.execute("DELETE FROM profiles WHERE tenant = ? AND name = ?", (tenant, name))
        return cur.rowcount > 0

    def list(self, tenant: str) -> list[dict[str, Any]]:
        """`tenant`'s own profiles and the global ones, by name (own before global on a tie)."""
        _check_tenant(tenant)
        rows = self.db.query("SELECT tenant, name, spec, updated FROM profiles WHERE tenant IN (?, ?) "
                             "ORDER BY name, tenant = ?", (tenant, GLOBAL, GLOBAL))
        return [{"name": name, "scope": "global" if owner == GLOBAL else "tenant", "spec": json.loads(spec),
                 "updated": updated} for owner, name, spec, updated in rows]
