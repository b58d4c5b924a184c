"""The repository layer's backend-neutral part: the `Database` interface the stores program against, its results,
and the 503 it raises when the database cannot be reached. The backends: `SQLiteDatabase` (server/stores/database.py)
and `PostgresDatabase` (server/stores/postgres.py); `open_database` (database.py) picks one by URL."""
from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

from steerserve.server.http.errors import Unavailable

if TYPE_CHECKING:
    from pathlib import Path

Row = tuple[Any, ...]
SQLITE_TYPES = {"real": "REAL", "id": "INTEGER PRIMARY KEY AUTOINCREMENT"}  # the default dialect's types


class DatabaseUnavailable(Unavailable):
    """The database cannot be reached now: a 503 the client may retry; the store reconnects on the next call."""

    def __init__(self, detail: str):
        super().__init__(f"the database is unavailable ({detail[:200]}); retry shortly", code="database_unavailable")


class Result:
    """What one statement returned: its rows (empty for writes without RETURNING) and the rows it changed."""

    __slots__ = ("rows", "rowcount")

    def __init__(self, rows: list[Row], rowcount: int):
        self.rows, self.rowcount = rows, rowcount

    def one(self) -> Row | None:
        return self.rows[0] if self.rows else None


class Session(Protocol):
    """The statements of one open transaction."""

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Result: ...


class Database:
    """A connection to one database, thread-safe (one connection behind a lock). Subclasses supply the backend."""

    dialect = ""
    types: dict[str, str] = SQLITE_TYPES
    path: Path | None = None  # the SQLite file, None for a server database

    def __init__(self) -> None:
        self._lock = threading.RLock()

    # --- the backend's part ---
    def _run(self, sql: str, args: Sequence[Any]) -> Result:
        raise NotImplementedError

    @contextmanager
    def _transaction(self, lock: str | None) -> Iterator[Session]:
        raise NotImplementedError
        yield  # pragma: no cover

    def close(self) -> None:
        raise NotImplementedError

    # --- the stores' part ---
    def execute(self, sql: str, args: Sequence[Any] = ()) -> Result:
        with self._lock:
            return self._run(sql, args)

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        return self.execute(sql, args).rows

    def query_one(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        return self.execute(sql, args).one()

    @contextmanager
    def transaction(self, lock: str | None = None) -> Iterator[Session]:
        """Statements run atomically: committed when the block ends, rolled back if it raises."""
        with self._lock, self._transaction(lock) as session:
            yield session

    def migrate(self, component: str, steps: Sequence[str | Sequence[str]]) -> int:
        """Bring `component`'s schema to len(steps); returns the version. Each step is a statement or a tuple of
        them, with `{real}`/`{id}` for the types that differ between backends. RuntimeError if the database holds a
        newer version than this code knows (a newer server migrated it: this one must not write to it)."""
        with self.transaction(lock="schema") as tx:  # replicas starting together: one migrates, the others wait
            tx.execute("CREATE TABLE IF NOT EXISTS schema_versions (component TEXT PRIMARY KEY, "
                       "version INTEGER NOT NULL)")
            row = tx.execute("SELECT version FROM schema_versions WHERE component = ?", (component,)).one()
            version = row[0] if row else 0
            if version > len(steps):
                raise RuntimeError(f"the database's {component!r} schema is version {version}, newer than this "
                                   f"server's {len(steps)}: upgrade the server")
            for step in steps[version:]:
                for statement in (step,) if isinstance(step, str) else step:
                    tx.execute(statement.format(**self.types))
            if version < len(steps):
                tx.execute("INSERT INTO schema_versions (component, version) VALUES (?, ?) ON CONFLICT (component) "
                           "DO UPDATE SET version = excluded.version", (component, len(steps)))
        return len(steps)

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def redact(url: str) -> str:
    """`url` without its password (for logs and errors)."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return url
    userinfo, _, host = rest.partition("@")
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{host}"
