"""The same store behaviour on both backends (SQLite file, real PostgreSQL): profiles, tenant settings, URIAL
prefixes, the adapter registry and the vector registry, each opened on the `database` fixture (run twice)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from steerserve.server.adapters import registry
from steerserve.server.adapters.registry import AdapterStore
from steerserve.server.stores.database import Database, open_database
from steerserve.server.stores.prefixes import PrefixStore
from steerserve.server.stores.profiles import GLOBAL, ProfileStore
from steerserve.server.stores.tenants import TenantSettingsUpdate, TenantStore
from steerserve.server.stores.vectors import VectorStore
from steerserve.steering.control_vectors import ControlVector

SPEC_A = {"vectors": [{"layer": 1, "scale": 4.0, "direction": "happy"}], "note": "ünïcode ✓"}
SPEC_G = {"vectors": [{"layer": 2, "scale": -1.5, "direction": "global"}]}


def test_profiles_scoping_resolve_list_delete(database: Database) -> None:
    s = ProfileStore(database)
    s.put("alice", "p", SPEC_A)
    s.put(GLOBAL, "p", SPEC_G)
    s.put(GLOBAL, "g", SPEC_G)
    assert s.get("alice", "p") == SPEC_A and s.get("bob", "p") is None
    assert s.resolve("alice", "p") == SPEC_A and s.resolve("bob", "p") == SPEC_G  # own shadows global
    assert [(e["name"], e["scope"]) for e in s.list("alice")] == [("g", "global"), ("p", "tenant"), ("p", "global")]
    s.put("alice", "p", SPEC_G)  # replace: one row, the new spec
    assert [e["spec"] for e in s.list("alice") if e["scope"] == "tenant"] == [SPEC_G]
    assert s.delete("alice", "p") and not s.delete("alice", "p")
    assert s.resolve("alice", "p") == SPEC_G


def test_profile_timestamps_keep_sub_second_precision(database: Database) -> None:
    # PostgreSQL's REAL is 4 bytes (~7 digits: whole minutes at today's epoch); the schema must use 8-byte floats.
    s = ProfileStore(database)
    s.put("alice", "p", SPEC_A)
    (updated,) = [e["updated"] for e in s.list("alice")]
    import time
    assert abs(updated - time.time()) < 5.0


def test_tenant_settings_update_keeps_unset_fields(database: Database) -> None:
    t = TenantStore(database)
    assert not t.get("alice").allow_conjugate
    assert t.update("alice", TenantSettingsUpdate(allow_conjugate=True)).allow_conjugate
    assert t.update("alice", TenantSettingsUpdate()).allow_conjugate  # nothing given: nothing changes
    assert t.get("alice").allow_conjugate and not t.get("bob").allow_conjugate
    assert t.list() == [{"tenant": "alice", "allow_conjugate": True}]


def test_prefixes_put_get_list_delete(database: Database) -> None:
    p = PrefixStore(database)
    text = "# Query:\n```Hi```\n\n# Answer:\n```Hello```\n"
    assert p.put("mine", text)["builtin"] is False
    assert p.get("mine") == text and p.get("nope") is None and p.get("../etc") is None
    assert {e["name"] for e in p.list()} >= {"default", "help", "mine"}
    with pytest.raises(ValueError, match="built-in"):
        p.put("default", text)
    with pytest.raises(ValueError, match="empty"):
        p.put("blank", "  \n")
    assert p.delete("mine") and not p.delete("mine") and p.get("mine") is None


@pytest.fixture
def fake_kind(monkeypatch: pytest.MonkeyPatch) -> str:
    """An adapter kind whose inspection always passes: these tests are about storage, not validation."""
    monkeypatch.setitem(registry.INSPECTORS, "fake", lambda path, base: {"rank": 4})
    monkeypatch.setitem(registry.KIND_FILES, "fake", ())  # no files to copy into the artifact store
    return "fake"


def test_adapters_register_replace_resolve_delete(database: Database, tmp_path: Path, fake_kind: str) -> None:
    a = AdapterStore(database, tmp_path / "files")
    first, replaced = a.register("alice", "ad", fake_kind, tmp_path / "a1", base=None)
    assert replaced is None and first.meta["rank"] == 4 and first.meta["source"] == str(tmp_path / "a1")
    second, replaced = a.register("alice", "ad", fake_kind, tmp_path / "a2", base=None)
    assert replaced == first and second.id > first.id  # a new engine id: the old one is never reused
    glob, _ = a.register(GLOBAL, "ad", fake_kind, tmp_path / "g", base=None)
    assert a.resolve("alice", "ad") == second and a.resolve("bob", "ad") == glob
    assert [x.id for x in a.list("alice")] == [second.id, glob.id] and len(a.all()) == 2
    assert a.delete("alice", "ad") == second and a.delete("alice", "ad") is None
    assert a.resolve("alice", "ad") == glob
    third, _ = a.register("alice", "other", fake_kind, tmp_path / "a3", base=None)
    assert third.id > glob.id  # ids are never reused, deletes included


def test_vectors_put_resolve_delete_and_files(database: Database, tmp_path: Path) -> None:
    v = VectorStore(database, tmp_path / "vectors")
    one = ControlVector.of({0: np.ones(8), 3: np.arange(8)}, "tiny")
    two = ControlVector.of({1: -np.ones(8)})
    rec = v.put("alice", "x", one)
    v.put(GLOBAL, "x", one)  # same content: one file
    assert len(list((tmp_path / "vectors").iterdir())) == 1
    got, vec = v.resolve("alice", "x")
    assert got == rec and got.layers == (0, 3) and np.array_equal(vec.directions[3], np.arange(8))
    v.put("alice", "x", two)  # the first file is still the global's
    assert len(list((tmp_path / "vectors").iterdir())) == 2
    assert v.delete(GLOBAL, "x")  # now no row refers to the first file: it goes
    assert [p.stem for p in (tmp_path / "vectors").iterdir()] == [two.digest()]
    assert [r.name for r in v.list("alice")] == ["x"] and v.get("bob", "x") is None
    assert v.delete("alice", "x") and not v.delete("alice", "x")


def test_a_second_connection_reads_through(database_url: str, tmp_path: Path, fake_kind: str) -> None:
    """Two replicas = two connections: what one writes, the other's next read sees (no cache hides it)."""
    with open_database(database_url) as one, open_database(database_url) as two:
        p1, p2 = ProfileStore(one), ProfileStore(two)
        assert p2.get("alice", "p") is None
        p1.put("alice", "p", SPEC_A)
        assert p2.get("alice", "p") == SPEC_A
        a1, a2 = AdapterStore(one, tmp_path / "f"), AdapterStore(two, tmp_path / "f")
        assert a2.resolve("alice", "ad") is None
        new, _ = a1.register("alice", "ad", fake_kind, tmp_path / "a", base=None)
        assert a2.resolve("alice", "ad") == new
        t1, t2 = TenantStore(one), TenantStore(two)
        assert not t2.get("alice").allow_conjugate
        t1.update("alice", TenantSettingsUpdate(allow_conjugate=True))
        assert t2.get("alice").allow_conjugate
        x1, x2 = PrefixStore(one), PrefixStore(two)
        x1.put("mine", "some prefix")
        assert x2.get("mine") == "some prefix"
        v1, v2 = VectorStore(one, tmp_path / "v"), VectorStore(two, tmp_path / "v")
        v1.put("alice", "x", ControlVector.of({0: np.ones(4)}))
        assert v2.resolve("alice", "x")[0].digest == ControlVector.of({0: np.ones(4)}).digest()
