"""API keys -> (tenant, role): the key file, constant-time bearer authentication, open mode and `keys add`."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import ipaddress
import json
import os
import re
import secrets
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import Unauthorized

ROLES = ("user", "admin", "metrics")  # metrics: may read /metrics and nothing else (a Prometheus scraper)
KEY_PREFIX = "sk-steer-"
OPEN_TENANT = "default"
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")
_FIELDS = frozenset({"tenant", "role", "sha256", "name"})
# One message for every failure after the header parses, so a response never tells a guesser anything.
_INVALID_KEY = "invalid API key"


class KeyFileError(ValueError):
    """The key file is unreadable or an entry is malformed; the message names the file, entry and field."""


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: a tenant (scope of its profiles) and a role."""

    tenant: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def reads_metrics(self) -> bool:
        return self.role in ("admin", "metrics")


def valid_tenant(tenant: object) -> bool:
    return isinstance(tenant, str) and _NAME_RE.fullmatch(tenant) is not None


def _is_json(path: Path) -> bool:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return True
    if suffix in (".yaml", ".yml"):
        return False
    raise KeyFileError(f"{path}: key file must end in .json, .yaml or .yml")


def _parse(path: Path, text: str) -> list[Any]:
    try:
        data = json.loads(text) if _is_json(path) else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise KeyFileError(f"{path}: not valid {'JSON' if _is_json(path) else 'YAML'}: {exc}") from None
    if data is None:  # an empty YAML file: no keys yet
        return []
    if not isinstance(data, list):
        raise KeyFileError(f"{path}: expected a list of key entries, got {type(data).__name__}")
    return data


def _check_entry(path: Path, index: int, entry: Any) -> tuple[bytes, Principal]:
    """The entry's digest and principal, or KeyFileError naming the entry (index and name) and the field."""
    where = f"{path}: entry {index}"
    if not isinstance(entry, dict):
        raise KeyFileError(f"{where}: expected a mapping with tenant, role, sha256, got {type(entry).__name__}")
    if isinstance(entry.get("name"), str):
        where += f" ({entry['name']!r})"
    unknown = sorted(str(k) for k in entry if k not in _FIELDS)
    if unknown:  # a typo like `sha265` would otherwise silently drop a key
        raise KeyFileError(f"{where}: unknown field {unknown[0]!r} (allowed: name, role, sha256, tenant)")
    for field in ("tenant", "role", "sha256"):
        if field not in entry:
            raise KeyFileError(f"{where}: field {field!r} is missing")
    if not valid_tenant(entry["tenant"]):
        raise KeyFileError(f"{where}: field 'tenant' must match [A-Za-z0-9_.-]{{1,64}}, got {entry['tenant']!r}")
    if entry["role"] not in ROLES:
        raise KeyFileError(f"{where}: field 'role' must be one of {', '.join(ROLES)}, got {entry['role']!r}")
    sha = entry["sha256"]
    if not isinstance(sha, str) or not _SHA256_RE.fullmatch(sha):
        raise KeyFileError(f"{where}: field 'sha256' must be 64 hex characters (sha256 of the key)")
    if "name" in entry and not isinstance(entry["name"], str):
        raise KeyFileError(f"{where}: field 'name' must be a string")
    return bytes.fromhex(sha), Principal(tenant=entry["tenant"], role=entry["role"])


def _entries(path: Path, raw: list[Any]) -> list[tuple[bytes, Principal]]:
    entries, seen = [], {}
    for index, item in enumerate(raw):
        digest, principal = _check_entry(path, index, item)
        if digest in seen:  # one key, two tenants: which one wins would be an accident
            raise KeyFileError(f"{path}: entry {index}: field 'sha256' duplicates entry {seen[digest]}")
        seen[digest] = index
        entries.append((digest, principal))
    return entries


class KeyStore:
    """The configured keys (as sha256 digests only), or open mode where every request is the default admin."""

    def __init__(self, entries: list[tuple[bytes, Principal]], *, is_open: bool = False):
        self._entries = list(entries)
        self._open = is_open

    @classmethod
    def open(cls) -> KeyStore:
        """No keys configured: every request is Principal("default", "admin"). Only safe on loopback."""
        return cls([], is_open=True)

    @classmethod
    def load(cls, path: str | Path) -> KeyStore:
        """The key file at `path` (JSON or YAML by extension), validated; KeyFileError (a ValueError) if bad."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise KeyFileError(f"{path}: cannot read key file: {exc.strerror or exc}") from None
        # An empty list is a closed store that rejects everything, never open mode: failing closed.
        return cls(_entries(path, _parse(path, text)))

    @property
    def is_open(self) -> bool:
        return self._open

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return "KeyStore(open)" if self._open else f"KeyStore({len(self._entries)} keys)"

    def authenticate(self, authorization_header: str | None) -> Principal:
        """The principal for an `Authorization: Bearer <key>` header; Unauthorized otherwise (never echoing the key)."""
        if self._open:
            return Principal(tenant=OPEN_TENANT, role="admin")
        if not authorization_header:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
        scheme, _, key = authorization_header.strip().partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key or any(c.isspace() for c in key):
            raise Unauthorized("malformed Authorization header: expected 'Bearer <key>'",
                               code="invalid_authorization_header")
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
        # Compare against every stored digest without an early exit, so timing says nothing about which matched.
        found: Principal | None = None
        for stored, principal in self._entries:
            if hmac.compare_digest(stored, digest):
                found = principal
        if found is None:
            raise Unauthorized(_INVALID_KEY, code="invalid_api_key")
        return found


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1 (also bracketed, or IPv4-mapped)."""
    host = host.strip().strip("[]").rstrip(".").lower()
    if host == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])  # drop an IPv6 zone id
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def check_bind(host: str, store: KeyStore) -> None:
    """ValueError if open mode (no keys) would be reachable beyond this machine."""
    if store.is_open and not is_loopback(host):
        raise ValueError(f"refusing to serve without API keys on {host!r}: configure a key file "
                         "(`steerserve keys add`) or bind to 127.0.0.1")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    # Two concurrent `keys add` would otherwise both read N entries and one write would drop the other's key.
    lock_path = path.with_name(f".{path.name}.lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _render(path: Path, old_text: str, raw: list[Any], entry: dict[str, str]) -> str:
    if _is_json(path):
        return json.dumps([*raw, entry], indent=2) + "\n"
    # Appending keeps the operator's comments and layout; fall back to a full dump if the file isn't a block list.
    appended = (old_text.rstrip("\n") + "\n" if old_text.strip() else "") + yaml.safe_dump([entry], sort_keys=False)
    with contextlib.suppress(yaml.YAMLError):
        if yaml.safe_load(appended) == [*raw, entry]:
            return appended
    return yaml.safe_dump([*raw, entry], sort_keys=False)


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # created 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def add_key(path: str | Path, tenant: str, role: str, name: str | None = None) -> str:
    """Generate a key for (tenant, role), append its sha256 to the key file (mode 0600) and return the key."""
    path = Path(path)
    _is_json(path)  # fail on a bad extension before generating anything
    if not valid_tenant(tenant):
        raise ValueError(f"tenant must match [A-Za-z0-9_.-]{{1,64}}, got {tenant!r}")
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        old_text = path.read_text() if path.exists() else ""
        raw = _parse(path, old_text) if old_text.strip() else []
        _entries(path, raw)  # never append to (and rewrite) a file that is already broken
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        entry = {"tenant": tenant, "role": role, "sha256": hashlib.sha256(key.encode()).hexdigest()}
        if name is not None:
            entry["name"] = name
        _write_atomic(path, _render(path, old_text, raw, entry))
    return key
