"""Unit tests for steering profiles (server/stores/profiles.py): scoping, global fallback, persistence, names, threads."""

from __future__ import annotations

import json
import sqlite3
import threading
from contextlib import closing
from pathlib import Path
from types import SimpleNamespace

import pytest

from steerserve.server.http.errors import BadRequest
from steerserve.server.stores import profiles
from steerserve.server.stores.profiles import GLOBAL, ProfileStore, validate_name

SPEC_A = {"vectors": [{"layer": 10, "scale": 4.0, "direction": "happy"}]}
SPEC_B = {"vectors": [{"layer": 3, "scale": -2.5, "direction": "formal"}], "note": "ünïcode ✓"}
SPEC_G = {"vectors": [{"layer": 6, "scale": 1.0, "direction": "global"}]}


@pytest.fixture
def store(tmp_path: Path):
    with ProfileStore(tmp_path / "nested" / "dir" / "profiles.sqlite3") as s:
        yield s


def test_put_get_roundtrip_and_overwrite(store: ProfileStore) -> None:
    assert store.get("alice", "happy") is None
    store.put("alice", "happy", SPEC_A)
    assert store.get("alice", "happy") == SPEC_A
    store.put("alice", "happy", SPEC_B)
    assert store.get("alice", "happy") == SPEC_B
    assert len(store.list("alice")) == 1


def test_tenants_are_isolated(store: ProfileStore) -> None:
    store.put("alice", "happy", SPEC_A)
    assert store.get("bob", "happy") is None
    assert store.resolve("bob", "happy") is None
    assert store.list("bob") == []
    assert store.delete("bob", "happy") is False
    assert store.get("alice", "happy") == SPEC_A


def test_resolve_prefers_tenant_over_global(store: ProfileStore) -> None:
    store.put(GLOBAL, "tone", SPEC_G)
    assert store.resolve("alice", "tone") == SPEC_G  # falls back to global
    assert store.get("alice", "tone") is None  # get is exact scope only
    store.put("alice", "tone", SPEC_A)
    assert store.resolve("alice", "tone") == SPEC_A  # own shadows global
    assert store.resolve("bob", "tone") == SPEC_G  # others still see the global one
    assert store.get(GLOBAL, "tone") == SPEC_G
    assert store.delete("alice", "tone") is True
    assert store.resolve("alice", "tone") == SPEC_G
    assert store.resolve("alice", "missing") is None


def test_delete(store: ProfileStore) -> None:
    store.put("alice", "happy", SPEC_A)
    store.put(GLOBAL, "happy", SPEC_G)
    assert store.delete("alice", "happy") is True
    assert store.delete("alice", "happy") is False
    assert store.get(GLOBAL, "happy") == SPEC_G  # deleting a tenant's own never touches the global one
    assert store.delete(GLOBAL, "happy") is True
    assert store.resolve("alice", "happy") is None


def test_list_own_and_global(store: ProfileStore) -> None:
    store.put("alice", "zeta", SPEC_A)
    store.put("alice", "shared", SPEC_B)
    store.put(GLOBAL, "shared", SPEC_G)
    store.put(GLOBAL, "alpha", SPEC_G)
    store.put("bob", "secret", SPEC_B)
    listed = store.list("alice")
    assert [(e["name"], e["scope"]) for e in listed] == [
        ("alpha", "global"), ("shared", "tenant"), ("shared", "global"), ("zeta", "tenant")]
    assert listed[1]["spec"] == SPEC_B and listed[2]["spec"] == SPEC_G
    assert all(isinstance(e["updated"], float) and set(e) == {"name", "scope", "spec", "updated"} for e in listed)
    assert [(e["name"], e["scope"]) for e in store.list(GLOBAL)] == [("alpha", "global"), ("shared", "global")]
    assert [e["name"] for e in store.list("bob")] == ["alpha", "secret", "shared"]


def test_updated_moves_forward(store: ProfileStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """An overwrite replaces the spec and stamps the time of the overwrite; the other profiles keep theirs."""
    clock = iter([1000.0, 1500.0, 2000.0])
    monkeypatch.setattr(profiles, "time", SimpleNamespace(time=lambda: next(clock)))  # this module's clock only
    store.put("alice", "p", SPEC_A)
    store.put("alice", "q", SPEC_G)
    assert [(e["name"], e["spec"], e["updated"]) for e in store.list("alice")] == [
        ("p", SPEC_A, 1000.0), ("q", SPEC_G, 1500.0)]
    store.put("alice", "p", SPEC_B)
    assert [(e["name"], e["spec"], e["updated"]) for e in store.list("alice")] == [
        ("p", SPEC_B, 2000.0), ("q", SPEC_G, 1500.0)]
    with closing(sqlite3.connect(store.path)) as conn:  # one row for (alice, p): the old spec is gone
        rows = conn.execute("SELECT spec FROM profiles WHERE tenant = 'alice' AND name = 'p'").fetchall()
    assert [json.loads(spec) for spec, in rows] == [SPEC_B]


def test_persists_after_reopen(tmp_path: Path) -> None:
    path = tmp_path / "profiles.sqlite3"
    with ProfileStore(path) as s:
        s.put("alice", "happy", SPEC_A)
        s.put(GLOBAL, "tone", SPEC_G)
    with ProfileStore(path) as s:
        assert s.get("alice", "happy") == SPEC_A
        assert s.resolve("alice", "tone") == SPEC_G
        assert {e["name"] for e in s.list("alice")} == {"happy", "tone"}
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT count(*) FROM profiles").fetchone()[0] == 2
    finally:
        conn.close()


def test_two_stores_on_one_file_see_each_other(tmp_path: Path) -> None:
    path = tmp_path / "p.sqlite3"
    with ProfileStore(path) as a, ProfileStore(path) as b:
        a.put("alice", "x", SPEC_A)
        assert b.get("alice", "x") == SPEC_A


@pytest.mark.parametrize("name", ["a", "happy", "v1.2", "my_profile-3", "A" * 64, "..."])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "A" * 65, "has space", "slash/y", "ünï", "*", "x\n", "a;drop", None, 5])
def test_invalid_names(store: ProfileStore, name: object) -> None:
    with pytest.raises(BadRequest) as err:
        validate_name(name)
    assert err.value.param == "name" and err.value.status == 400
    for op in (lambda: store.put("alice", name, SPEC_A), lambda: store.get("alice", name),  # type: ignore[arg-type]
               lambda: store.resolve("alice", name), lambda: store.delete("alice", name)):  # type: ignore[arg-type]
        with pytest.raises(BadRequest):
            op()


def test_bad_tenant_or_spec_is_a_programming_error(store: ProfileStore) -> None:
    with pytest.raises(ValueError, match="tenant"):
        store.put("", "p", SPEC_A)
    with pytest.raises(ValueError, match="tenant"):
        store.list("a b")
    with pytest.raises(TypeError):
        store.put("alice", "p", ["not", "a", "dict"])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        store.put("alice", "p", {"scale": float("nan")})
    assert store.get("alice", "p") is None


def test_concurrent_puts_from_threads(store: ProfileStore) -> None:
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for i in range(50):
                store.put(f"tenant{t}", f"p{i}", {"t": t, "i": i})
                assert store.resolve(f"tenant{t}", f"p{i}") == {"t": t, "i": i}
                store.put(GLOBAL, "shared", {"t": t, "i": i})
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    for t in range(8):
        own = [e for e in store.list(f"tenant{t}") if e["scope"] == "tenant"]
        assert len(own) == 50 and all(e["spec"]["t"] == t for e in own)
    assert store.get(GLOBAL, "shared") is not None
