"""The one repository layer under every store: connections, transactions and schema migrations, for the embedded
default (SQLite files, as before) and PostgreSQL (`--database-url postgresql://...`).

A `Database` runs the stores' SQL, written once in SQLite's dialect with `?` placeholders; the PostgreSQL backend
(server/stores/postgres.py, imported only when a postgresql:// URL is opened, so psycopg is never imported by the
embedded default) rewrites the placeholders and the few type names that differ (`{real}`, `{id}` in schema text).

Contracts:
- `execute`/`query`/`query_one` run one statement as its own transaction (autocommit): durable once they return.
- `transaction(lock=...)` runs several statements atomically; `lock` names a write lock held until the commit
  (SQLite: BEGIN IMMEDIATE, one writer per file; PostgreSQL: a transaction-scoped advisory lock on the name), so
  two processes doing read-modify-write on the same table serialise instead of losing an update.
- Nothing is cached here: every read goes to the database, so a row another process (replica) wrote is visible to
  the next read.
- When the database cannot be reached (PostgreSQL down or restarting, an SQLite file locked past its timeout) a
  call raises `DatabaseUnavailable`, an HTTP 503 in OpenAI's error shape; the next call reconnects by itself.
- `migrate(component, steps)`: a minimal versioned schema. Table `schema_versions(component, version)` records how
  many of a component's steps ran; the rest run in one transaction under the "schema" lock, so replicas starting
  together apply each step once. Steps are append-only: never edit one that has shipped, add the next.
"""
from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from steerserve.server.http.errors import Unavailable

Row = tuple[Any, ...]
SQLITE_TYPES = {"real": "REAL", "id": "INTEGER PRIMARY KEY AUTOINCREMENT"}


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


class SQLiteDatabase(Database):
    """One SQLite file in WAL mode: readers never block the writer, several processes may share the file (a
    writer waits up to `timeout` seconds for another's transaction, then DatabaseUnavailable)."""

    dialect = "sqlite"

    def __init__(self, path: str | Path, synchronous: str = "NORMAL", timeout: float = 10.0):
        super().__init__()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit (isolation_level=None): a statement outside `transaction` is its own transaction.
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=timeout)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL: durable across process crashes; FULL: across power loss too.
        self._db.execute(f"PRAGMA synchronous={synchronous}")

    def __repr__(self) -> str:
        return f"SQLiteDatabase({str(self.path)!r})"

    def _run(self, sql: str, args: Sequence[Any]) -> Result:
        try:
            cur = self._db.execute(sql, tuple(args))
            return Result(cur.fetchall(), cur.rowcount)
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise DatabaseUnavailable(f"SQLite: {exc}") from exc
            raise

    @contextmanager
    def _transaction(self, lock: str | None) -> Iterator[Session]:
        self._run("BEGIN IMMEDIATE", ())  # the file's write lock now: a read-modify-write cannot interleave
        try:
            yield self
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()


def open_database(url: str | Path, synchronous: str = "NORMAL") -> Database:
    """The database at `url`: postgresql://... (or postgres://) for PostgreSQL, sqlite:///path or a plain path for
    an SQLite file (`synchronous` is its PRAGMA; PostgreSQL's commits are durable by its own settings)."""
    text = str(url)
    if text.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresDatabase  # psycopg is imported here and nowhere else

        return PostgresDatabase(text)
    if text.startswith("sqlite:///"):
        text = text[len("sqlite:///"):]
    elif "://" in text:
        raise ValueError(f"unsupported database URL {redact(text)!r}: use postgresql://... or an SQLite path")
    return SQLiteDatabase(text, synchronous=synchronous)


def as_database(where: str | Path | Database, synchronous: str = "NORMAL") -> Database:
    """`where` itself if it is a Database, else the SQLite file at that path (how stores take either)."""
    return where if isinstance(where, Database) else open_database(where, synchronous)


def redact(url: str) -> str:
    """`url` without its password (for logs and errors)."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return url
    userinfo, _, host = rest.partition("@")
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{host}"
