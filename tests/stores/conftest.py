"""The store suite's databases: every test taking `database` runs twice, on an SQLite file and on a real
PostgreSQL 16 (the `pgserver` wheel's binaries), started once per session here and stopped at its end.

Each PostgreSQL test starts on an empty database (the schema is dropped and made again), so tests never see each
other's rows.
"""
from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from steerserve.server.stores.database import Database, open_database


def start_postgres(root: Path):
    """A PostgreSQL server with its data under `root` (stopped by `srv.cleanup()`). As root, pgserver runs the
    server as a system user `pgserver`, which must be able to reach `root`: see `pg_data_dir`."""
    import pgserver

    return pgserver.get_server(root, cleanup_mode="stop")


@contextmanager
def pg_data_dir() -> Iterator[Path]:
    """A fresh directory for a PostgreSQL data dir, removed afterwards. Not under pytest's tmp_path: pytest resets
    its per-user root to mode 0700 whenever a session starts, which would lock the server's user out of it."""
    root = Path(tempfile.mkdtemp(prefix="steerserve-pg-"))
    try:
        yield root / "data"
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[object]:
    with pg_data_dir() as data:
        srv = start_postgres(data)
        try:
            yield srv
        finally:
            srv.cleanup()


@pytest.fixture(scope="session")
def postgres_url(postgres) -> str:
    """The URL of the suite's PostgreSQL test database (created once)."""
    postgres.psql("CREATE DATABASE steerserve_test;")
    return postgres.get_uri("steerserve_test")


def reset_postgres(url: str) -> None:
    """Empty the test database: every table goes with the schema (faster than a database per test, which would
    leave PostgreSQL ~8 MB of WAL per test to checkpoint at shutdown)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path: Path) -> str:
    """Where one test's stores live: an SQLite file path, or a fresh PostgreSQL database's URL."""
    if request.param == "sqlite":
        return str(tmp_path / "state.sqlite3")
    url = request.getfixturevalue("postgres_url")
    reset_postgres(url)
    return url


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    with open_database(database_url) as db:
        yield db
