"""The repository layer itself (server/stores/database.py) on both backends: versioned migrations, transactions,
concurrent writers on separate connections, the old SQLite files still opening, psycopg not imported by default."""
from __future__ import annotations

import json
import multiprocessing
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from steerserve.server.adapters import registry
from steerserve.server.adapters.registry import AdapterStore
from steerserve.server.stores.database import Database, open_database, redact
from steerserve.server.stores.prefixes import PrefixStore
from steerserve.server.stores.profiles import ProfileStore
from steerserve.server.stores.tenants import TenantSettingsUpdate, TenantStore

STEPS = ("CREATE TABLE things (id {id}, label TEXT NOT NULL, at {real} NOT NULL)",
         ("ALTER TABLE things ADD COLUMN color TEXT NOT NULL DEFAULT 'red'",
          "CREATE INDEX things_color ON things (color)"))


def test_migrations_run_once_in_order_and_refuse_a_newer_schema(database: Database) -> None:
    assert database.migrate("things", STEPS[:1]) == 1
    database.execute("INSERT INTO things (label, at) VALUES (?, ?)", ("a", 1.25))
    assert database.migrate("things", STEPS[:1]) == 1  # again: nothing runs (a CREATE without IF NOT EXISTS)
    assert database.migrate("things", STEPS) == 2  # only the new step runs; the row is kept and gets the default
    assert database.query("SELECT id, label, at, color FROM things") == [(1, "a", 1.25, "red")]
    assert database.query_one("SELECT version FROM schema_versions WHERE component = 'things'") == (2,)
    with pytest.raises(RuntimeError, match="newer than this server"):
        database.migrate("things", STEPS[:1])


def test_a_failed_migration_step_leaves_the_old_version(database: Database) -> None:
    database.migrate("things", STEPS[:1])
    with pytest.raises(Exception):  # noqa: B017 - each backend raises its own error class
        database.migrate("things", STEPS + ("THIS IS NOT SQL",))
    assert database.query_one("SELECT version FROM schema_versions WHERE component = 'things'") == (1,)
    assert "color" not in [c.lower() for c in _columns(database, "things")]  # step 2 rolled back with step 3


def _columns(db: Database, table: str) -> list[str]:
    if db.dialect == "sqlite":
        return [r[1] for r in db.query(f"PRAGMA table_info({table})")]
    return [r[0] for r in db.query("SELECT column_name FROM information_schema.columns WHERE table_name = ?",
                                   (table,))]


def test_transaction_rolls_back_both_rows(database: Database) -> None:
    database.migrate("things", STEPS[:1])
    with pytest.raises(KeyError), database.transaction(lock="things") as tx:
        tx.execute("INSERT INTO things (label, at) VALUES ('x', 0)")
        tx.execute("INSERT INTO things (label, at) VALUES ('y', 0)")
        raise KeyError("abandon")
    assert database.query("SELECT label FROM things") == []


def _writer(url: str, files: str, k: int, out) -> None:
    """One replica's writes (run in a child process): the same adapter name replaced, the same tenant updated."""
    registry.INSPECTORS["fake"] = lambda path, base: {}
    registry.KIND_FILES["fake"] = ()  # no files to copy into the artifact store
    try:
        with open_database(url) as db:
            adapters, profiles, tenants = AdapterStore(db, files), ProfileStore(db), TenantStore(db)
            ids = []
            for i in range(25):
                new, _ = adapters.register("alice", "same", "fake", Path(files) / f"{k}-{i}", base=None)
                ids.append(new.id)
                profiles.put("alice", f"p{k}-{i}", {"i": i})
                tenants.update("alice", TenantSettingsUpdate(allow_conjugate=bool(i % 2)))
        out.put(ids)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        out.put(repr(exc))


def test_concurrent_writers_in_two_processes(database_url: str, tmp_path: Path) -> None:
    """Two processes (as two replicas, each with its own connection) replace the same adapter and update the same
    tenant 25 times each, interleaved: no error, no lost or duplicated row, every engine id distinct."""
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(database_url, str(tmp_path / "f"), k, out)) for k in range(2)]
    [p.start() for p in procs]
    results = [out.get(timeout=120) for _ in procs]
    [p.join(30) for p in procs]
    assert all(isinstance(r, list) for r in results), results
    ids = [i for r in results for i in r]
    assert len(ids) == 50 == len(set(ids))
    with open_database(database_url) as db:
        (only,) = AdapterStore(db, tmp_path / "f").all()
        assert only.id == max(ids)  # the last registration won; every earlier one was replaced
        assert len(ProfileStore(db).list("alice")) == 50
        assert len(TenantStore(db).list()) == 1


OLD_PROFILES_SCHEMA = """CREATE TABLE profiles (tenant TEXT NOT NULL, name TEXT NOT NULL, spec TEXT NOT NULL,
    updated REAL NOT NULL, PRIMARY KEY (tenant, name))"""
OLD_ADAPTERS_SCHEMA = """CREATE TABLE adapters (id INTEGER PRIMARY KEY AUTOINCREMENT, tenant TEXT NOT NULL,
    name TEXT NOT NULL, kind TEXT NOT NULL, path TEXT NOT NULL, owned INTEGER NOT NULL, meta TEXT NOT NULL,
    created REAL NOT NULL, UNIQUE (tenant, name))"""


def test_data_dirs_from_before_the_repository_layer_keep_working(tmp_path: Path) -> None:
    """SQLite files written by the previous stores (no schema_versions table) and URIAL prefix files open with
    their data; the prefix files are imported once, so a prefix deleted afterwards stays deleted."""
    with sqlite3.connect(tmp_path / "profiles.sqlite3") as conn:
        conn.execute(OLD_PROFILES_SCHEMA)
        conn.execute("INSERT INTO profiles VALUES ('alice', 'p', ?, 1.5)", (json.dumps({"a": 1}),))
    with sqlite3.connect(tmp_path / "adapters.sqlite3") as conn:
        conn.execute(OLD_ADAPTERS_SCHEMA)
        conn.execute("INSERT INTO adapters VALUES (7, 'alice', 'ad', 'lora', '/x', 0, '{}', 2.5)")
    (tmp_path / "urial").mkdir()
    (tmp_path / "urial" / "mine.txt").write_text("my prefix", encoding="utf-8")
    assert ProfileStore(tmp_path / "profiles.sqlite3").get("alice", "p") == {"a": 1}
    assert AdapterStore(tmp_path / "adapters.sqlite3", tmp_path / "adapters").resolve("alice", "ad").id == 7
    prefixes = PrefixStore(tmp_path / "profiles.sqlite3", legacy_dir=tmp_path / "urial")
    assert prefixes.get("mine") == "my prefix"
    assert prefixes.delete("mine")
    assert PrefixStore(tmp_path / "profiles.sqlite3", legacy_dir=tmp_path / "urial").get("mine") is None


def test_the_embedded_default_never_imports_psycopg(tmp_path: Path) -> None:
    code = f"""
import sys
from pathlib import Path
from steerserve.server.cli import serve
from steerserve.server.http.app import create_app
from steerserve.server.http.auth import KeyStore
from steerserve.server.stores.profiles import ProfileStore
from steerserve.server.adapters.registry import AdapterStore
root = Path({str(tmp_path)!r})
create_app(lambda: None, KeyStore.open(), ProfileStore(root / "profiles.sqlite3"))
AdapterStore(root / "adapters.sqlite3", root / "adapters")
print(sorted(m for m in sys.modules if m.split(".")[0] in ("psycopg", "psycopg_binary", "pgserver")))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_unsupported_urls_and_redaction() -> None:
    with pytest.raises(ValueError, match="unsupported database URL 'mysql://u:\\*\\*\\*@h/db'"):
        open_database("mysql://u:secret@h/db")
    assert redact("postgresql://u:pw@host:5432/db") == "postgresql://u:***@host:5432/db"
    assert redact("postgresql:///db?host=/tmp") == "postgresql:///db?host=/tmp"


def test_serve_exits_1_when_its_database_is_unreachable(tmp_path: Path) -> None:
    """`--database-url` reaches the stores: a server whose database cannot be reached says so and exits 1 before
    loading the model (port 1 on loopback: nothing listens there)."""
    url = "postgresql://steerserve:secret@127.0.0.1:1/steerserve"
    out = subprocess.run([sys.executable, "-m", "steerserve.server", "serve", "--database-url", url,
                          "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "error: database: the database is unavailable (PostgreSQL:" in out.stderr
    assert "secret" not in out.stderr


def test_admin_commands_use_the_database_url(database_url: str, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """`steerserve urial add` and `steerserve tenants set` write where the server reads: STEERSERVE_DATABASE_URL
    (here an SQLite path or a PostgreSQL URL) when it is set, not the data dir's file."""
    from steerserve.server.cli import main
    from steerserve.server.settings import Settings

    monkeypatch.setenv("STEERSERVE_DATABASE_URL", database_url)
    assert Settings.load().database_url == database_url
    (tmp_path / "p.txt").write_text("# Query:\nhi", encoding="utf-8")
    data = str(tmp_path / "data")
    assert main(["urial", "add", "mine", str(tmp_path / "p.txt"), "--data-dir", data]) == 0
    assert main(["tenants", "set", "acme", "--allow-conjugate", "--data-dir", data]) == 0
    capsys.readouterr()
    with open_database(database_url) as db:
        assert PrefixStore(db).get("mine") == "# Query:\nhi"
        assert TenantStore(db).get("acme").allow_conjugate
    assert not (tmp_path / "data" / "profiles.sqlite3").exists()
