"""Unit tests for API-key auth (server/http/auth.py): key file validation, bearer parsing, open mode, `keys add`."""

from __future__ import annotations

import hashlib
import hmac
import json
import stat
import threading
from pathlib import Path

import pytest
import yaml

from steerserve.server.cli import main as cli_main
from steerserve.server.http import auth
from steerserve.server.http.auth import KeyFileError, KeyStore, Principal, add_key, check_bind
from steerserve.server.http.errors import Unauthorized

ALICE_KEY = "sk-steer-alice-secret-value"
ROOT_KEY = "sk-steer-root-secret-value"


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def write_yaml(path: Path, entries: object) -> Path:
    path.write_text(yaml.safe_dump(entries))
    return path


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    return KeyStore.load(write_yaml(tmp_path / "keys.yaml", [
        {"tenant": "alice", "role": "user", "sha256": sha(ALICE_KEY), "name": "alice laptop"},
        {"tenant": "ops", "role": "admin", "sha256": sha(ROOT_KEY).upper()},
    ]))


# --- authenticate -------------------------------------------------------------------------------------------

def test_good_keys_map_to_tenant_and_role(store: KeyStore) -> None:
    assert store.authenticate(f"Bearer {ALICE_KEY}") == Principal("alice", "user")
    root = store.authenticate(f"Bearer {ROOT_KEY}")
    assert root == Principal("ops", "admin") and root.is_admin
    assert not store.authenticate(f"Bearer {ALICE_KEY}").is_admin
    assert not store.is_open and len(store) == 2


def test_scheme_is_case_insensitive_and_whitespace_tolerated(store: KeyStore) -> None:
    assert store.authenticate(f"bearer {ALICE_KEY}").tenant == "alice"
    assert store.authenticate(f"  BEARER   {ALICE_KEY}  ").tenant == "alice"


@pytest.mark.parametrize("header", [None, ""])
def test_missing_header(store: KeyStore, header: str | None) -> None:
    with pytest.raises(Unauthorized) as err:
        store.authenticate(header)
    assert err.value.status == 401 and err.value.code == "missing_api_key"


@pytest.mark.parametrize("header", [
    ALICE_KEY, f"Basic {ALICE_KEY}", "Bearer", "Bearer ", "Bearer    ", f"Token {ALICE_KEY}",
    f"Bearer {ALICE_KEY} extra", f"Bearer{ALICE_KEY}",
])
def test_malformed_header(store: KeyStore, header: str) -> None:
    with pytest.raises(Unauthorized) as err:
        store.authenticate(header)
    assert err.value.code == "invalid_authorization_header"
    assert ALICE_KEY not in err.value.message and ALICE_KEY not in str(err.value.body())


@pytest.mark.parametrize("key", ["sk-steer-nope", ALICE_KEY + "x", ALICE_KEY[:-1], sha(ALICE_KEY), "\udcff"])
def test_unknown_or_wrong_key_same_message_without_the_key(store: KeyStore, key: str) -> None:
    with pytest.raises(Unauthorized) as err:
        store.authenticate(f"Bearer {key}")
    assert err.value.message == "invalid API key" and err.value.code == "invalid_api_key"
    assert key not in repr(err.value) and key not in json.dumps(err.value.body())


def test_compares_against_every_stored_hash(store: KeyStore, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    store.authenticate(f"Bearer {ALICE_KEY}")  # matches the first entry: must still check the second
    assert len(calls) == 2
    with pytest.raises(Unauthorized):
        store.authenticate("Bearer sk-steer-nope")
    assert len(calls) == 4


def test_no_secret_in_reprs(store: KeyStore) -> None:
    principal = store.authenticate(f"Bearer {ALICE_KEY}")
    for text in (repr(store), str(store), repr(principal)):
        assert ALICE_KEY not in text and sha(ALICE_KEY) not in text.lower()


def test_principal_is_frozen() -> None:
    p = Principal("alice", "user")
    with pytest.raises(AttributeError):
        p.tenant = "bob"  # type: ignore[misc]


def test_empty_key_file_rejects_everything(tmp_path: Path) -> None:
    for path, text in ((tmp_path / "k.yaml", ""), (tmp_path / "k.json", "[]")):
        path.write_text(text)
        store = KeyStore.load(path)
        assert not store.is_open  # fail closed: an empty file is not open mode
        with pytest.raises(Unauthorized):
            store.authenticate(f"Bearer {ALICE_KEY}")


def test_json_key_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps([{"tenant": "t1", "role": "user", "sha256": sha(ALICE_KEY)}]))
    assert KeyStore.load(path).authenticate(f"Bearer {ALICE_KEY}") == Principal("t1", "user")


# --- key file validation ------------------------------------------------------------------------------------

GOOD = {"tenant": "alice", "role": "user", "sha256": sha(ALICE_KEY)}


@pytest.mark.parametrize(("entries", "expected"), [
    ({"tenant": "alice"}, "expected a list"),
    (["just a string"], "entry 0: expected a mapping"),
    ([GOOD, {"role": "user", "sha256": sha("k2")}], "entry 1: field 'tenant' is missing"),
    ([{"tenant": "alice", "sha256": sha("k2")}], "field 'role' is missing"),
    ([{"tenant": "alice", "role": "user"}], "field 'sha256' is missing"),
    ([{**GOOD, "tenant": "bad tenant"}], "field 'tenant' must match"),
    ([{**GOOD, "tenant": "*"}], "field 'tenant' must match"),
    ([{**GOOD, "tenant": "x" * 65}], "field 'tenant' must match"),
    ([{**GOOD, "tenant": ""}], "field 'tenant' must match"),
    ([{**GOOD, "tenant": 7}], "field 'tenant' must match"),
    ([{**GOOD, "role": "root"}], "field 'role' must be one of user, admin, metrics"),
    ([{**GOOD, "sha256": "abc"}], "field 'sha256' must be 64 hex"),
    ([{**GOOD, "sha256": "z" * 64}], "field 'sha256' must be 64 hex"),
    ([{**GOOD, "name": 5}], "field 'name' must be a string"),
    ([{**GOOD, "name": "svc", "sha265": "x"}], "entry 0 ('svc'): unknown field 'sha265'"),
    ([GOOD, {**GOOD, "tenant": "bob"}], "entry 1: field 'sha256' duplicates entry 0"),
])
def test_key_file_validation(tmp_path: Path, entries: object, expected: str) -> None:
    path = write_yaml(tmp_path / "keys.yml", entries)
    with pytest.raises(KeyFileError) as err:
        KeyStore.load(path)
    assert expected in str(err.value) and str(path) in str(err.value)
    assert isinstance(err.value, ValueError)


def test_key_file_unparseable_missing_or_wrong_extension(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(KeyFileError, match="not valid JSON"):
        KeyStore.load(tmp_path / "bad.json")
    (tmp_path / "bad.yaml").write_text("- [unclosed")
    with pytest.raises(KeyFileError, match="not valid YAML"):
        KeyStore.load(tmp_path / "bad.yaml")
    with pytest.raises(KeyFileError, match="cannot read"):
        KeyStore.load(tmp_path / "missing.yaml")
    (tmp_path / "keys.txt").write_text("[]")
    with pytest.raises(KeyFileError, match=r"\.json, \.yaml or \.yml"):
        KeyStore.load(tmp_path / "keys.txt")


# --- open mode and check_bind -------------------------------------------------------------------------------

@pytest.mark.parametrize("header", [None, "", "garbage", "Bearer anything"])
def test_open_mode_is_default_admin(header: str | None) -> None:
    store = KeyStore.open()
    assert store.is_open
    assert store.authenticate(header) == Principal(tenant="default", role="admin")


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost", "LOCALHOST",
                                  "::ffff:127.0.0.1"])
def test_check_bind_open_on_loopback_ok(host: str) -> None:
    check_bind(host, KeyStore.open())


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "192.168.1.2", "example.com", "", "128.0.0.1",
                                  "localhost.example.com"])
def test_check_bind_open_elsewhere_refused(host: str) -> None:
    with pytest.raises(ValueError, match="without API keys"):
        check_bind(host, KeyStore.open())


def test_check_bind_with_keys_any_host(store: KeyStore) -> None:
    check_bind("0.0.0.0", store)
    check_bind("::", store)


# --- add_key ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_add_key_round_trip_and_mode(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / "sub" / f"keys{suffix}"
    k1 = add_key(path, "alice", "user", name="laptop")
    k2 = add_key(path, "ops", "admin")
    assert k1.startswith("sk-steer-") and len(k1) > 40 and k1 != k2
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert k1 not in text and k2 not in text and sha(k1) in text  # only hashes are stored
    store = KeyStore.load(path)
    assert store.authenticate(f"Bearer {k1}") == Principal("alice", "user")
    assert store.authenticate(f"Bearer {k2}") == Principal("ops", "admin")
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_add_key_keeps_yaml_comments_and_tightens_mode(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(f"# production keys\n- tenant: alice\n  role: user\n  sha256: {sha(ALICE_KEY)}\n")
    path.chmod(0o644)
    key = add_key(path, "bob", "user")
    assert path.read_text().startswith("# production keys\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    store = KeyStore.load(path)
    assert store.authenticate(f"Bearer {ALICE_KEY}").tenant == "alice"
    assert store.authenticate(f"Bearer {key}").tenant == "bob"


def test_add_key_to_flow_style_yaml(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("[]\n")
    key = add_key(path, "bob", "user")
    assert KeyStore.load(path).authenticate(f"Bearer {key}").tenant == "bob"


def test_add_key_rejects_bad_input_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tenant"):
        add_key(tmp_path / "k.yaml", "bad tenant", "user")
    with pytest.raises(ValueError, match="role"):
        add_key(tmp_path / "k.yaml", "alice", "root")
    with pytest.raises(KeyFileError):
        add_key(tmp_path / "k.txt", "alice", "user")
    assert not (tmp_path / "k.yaml").exists()
    broken = write_yaml(tmp_path / "broken.yaml", [{"tenant": "alice"}])
    before = broken.read_text()
    with pytest.raises(KeyFileError, match="field 'role' is missing"):
        add_key(broken, "bob", "user")
    assert broken.read_text() == before


def test_concurrent_add_key_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    keys: list[str] = []
    threads = [threading.Thread(target=lambda i=i: keys.append(add_key(path, f"t{i}", "user"))) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store = KeyStore.load(path)
    assert len(store) == 8
    assert {store.authenticate(f"Bearer {k}").tenant for k in keys} == {f"t{i}" for i in range(8)}


def test_cli_keys_add_prints_key_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "keys.yaml"
    assert cli_main(["keys", "add", "--file", str(path), "--tenant", "alice", "--role", "admin",
                     "--name", "ci"]) == 0
    out = capsys.readouterr().out
    key = out.strip()
    assert key.startswith("sk-steer-") and out.count(key) == 1
    assert KeyStore.load(path).authenticate(f"Bearer {key}") == Principal("alice", "admin")


def test_cli_keys_add_bad_tenant_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["keys", "add", "--file", str(tmp_path / "k.yaml"), "--tenant", "a b", "--role", "user"]) == 1
    assert "tenant" in capsys.readouterr().err


def test_cli_keys_add_metrics_role(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`steerserve keys add --role metrics`: a key for a Prometheus scraper (it reads /metrics only:
    tests/http/test_security.py)."""
    path = tmp_path / "keys.yaml"
    assert cli_main(["keys", "add", "--file", str(path), "--tenant", "ops", "--role", "metrics"]) == 0
    key = capsys.readouterr().out.strip()
    who = KeyStore.load(path).authenticate(f"Bearer {key}")
    assert who == Principal("ops", "metrics") and who.reads_metrics and not who.is_admin
