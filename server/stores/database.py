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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .sql import Database, DatabaseUnavailable, Result, Row, Session, redact

__all__ = ["Database", "DatabaseUnavailable", "Result", "Row", "SQLiteDatabase", "Session", "as_database",
           "open_database", "redact"]


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
