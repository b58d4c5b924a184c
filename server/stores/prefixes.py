"""Registered URIAL prefixes by name, persisted through the repository layer (server/stores/database.py: the
profiles' SQLite file by default, or PostgreSQL), beside the built-in `default` and `help` (steering/urial.py).

Before the repository layer, registered prefixes were one text file each, `<data dir>/urial/<name>.txt`. A store
opened with `legacy_dir` imports those files once (the first open of that database; a migration step of its own),
so an existing data directory keeps its prefixes; later changes go to the database only.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from steerserve.steering import urial

from .database import Database, as_database

MAX_PREFIX_BYTES = 256 * 1024

MIGRATIONS = ("""
CREATE TABLE IF NOT EXISTS urial_prefixes (
    name    TEXT PRIMARY KEY,
    text    TEXT NOT NULL,
    updated {real} NOT NULL
)
""",)


class PrefixStore:
    """URIAL prefixes by name: the built-ins and those admins register (used verbatim; e.g. the official URIAL
    prompt files). Thread-safe, no cache (a prefix registered through another replica is used by the next request
    here). `where`: a Database, or the path of an SQLite file."""

    def __init__(self, where: str | Path | Database, legacy_dir: str | Path | None = None):
        self.db, self._owns_db = as_database(where), not isinstance(where, Database)
        self.db.migrate("urial_prefixes", MIGRATIONS)
        if legacy_dir is not None:
            self._import_files(Path(legacy_dir))

    def close(self) -> None:
        if self._owns_db:
            self.db.close()

    def get(self, name: str) -> str | None:
        if name in urial.BUILTIN_PREFIXES:
            return urial.BUILTIN_PREFIXES[name]
        try:
            urial.validate_prefix_name(name)
        except ValueError:
            return None
        row = self.db.query_one("SELECT text FROM urial_prefixes WHERE name = ?", (name,))
        return row[0] if row else None

    def put(self, name: str, text: str) -> dict[str, Any]:
        """Register (or replace) a prefix; ValueError if the name or text is unusable."""
        _check_writable(name, "replaced")
        if not text.strip():
            raise ValueError("the prefix is empty")
        if len(text.encode()) > MAX_PREFIX_BYTES:
            raise ValueError(f"the prefix is longer than {MAX_PREFIX_BYTES} bytes")
        self.db.execute("INSERT INTO urial_prefixes (name, text, updated) VALUES (?, ?, ?) ON CONFLICT (name) "
                        "DO UPDATE SET text = excluded.text, updated = excluded.updated", (name, text, time.time()))
        return describe(name, text, builtin=False)

    def delete(self, name: str) -> bool:
        _check_writable(name, "deleted")
        return self.db.execute("DELETE FROM urial_prefixes WHERE name = ?", (name,)).rowcount > 0

    def list(self) -> list[dict[str, Any]]:
        out = [describe(name, text, builtin=True) for name, text in urial.BUILTIN_PREFIXES.items()]
        rows = self.db.query("SELECT name, text FROM urial_prefixes ORDER BY name")
        return out + [describe(name, text, builtin=False) for name, text in rows if name not in urial.BUILTIN_PREFIXES]

    def _import_files(self, root: Path) -> None:
        """Import `<root>/<name>.txt` once per database (recorded as the schema component "urial_files")."""
        with self.db.transaction(lock="schema") as tx:
            if tx.execute("SELECT 1 FROM schema_versions WHERE component = 'urial_files'").one() is not None:
                return
            for path in sorted(root.glob("*.txt")) if root.is_dir() else []:
                try:
                    urial.validate_prefix_name(path.stem)
                    text = path.read_text(encoding="utf-8")
                except (ValueError, OSError):
                    continue  # not a prefix the old store would have served either
                if path.stem not in urial.BUILTIN_PREFIXES:
                    tx.execute("INSERT INTO urial_prefixes (name, text, updated) VALUES (?, ?, ?) "
                               "ON CONFLICT (name) DO NOTHING", (path.stem, text, path.stat().st_mtime))
            tx.execute("INSERT INTO schema_versions (component, version) VALUES ('urial_files', 1)")


def _check_writable(name: str, verb: str) -> None:
    urial.validate_prefix_name(name)
    if name in urial.BUILTIN_PREFIXES:
        raise ValueError(f"'{name}' is a built-in prefix and cannot be {verb}")


def describe(name: str, text: str, builtin: bool) -> dict[str, Any]:
    return {"name": name, "builtin": builtin, "examples": len(urial.split_examples(text)[1]), "chars": len(text)}
