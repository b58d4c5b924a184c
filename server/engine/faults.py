"""Faults of the engine-side steering hooks. A hook never raises inside the engine step (vLLM treats that as fatal
for the engine, and every tenant's requests with it). What it does instead depends on whom the fault belongs to:

- **one row** (its plan cannot be set up: an adapter whose files broke after registration, a stored vector that
  does not fit, an index out of range; or its own per-row work fails): the row is dropped from the method and
  its request's key (`ROW_KEY` in `SamplingParams.extra_args`, set by the server per HTTP request) is reported
  with the reason (`report_row`). The server checks the key before it hands out any of the request's output
  (`row_fault`), aborts the request and answers with an error naming it: the request is never served
  unsteered, and the other rows of the same step are served as usual.
- **the method** (the step's shared work fails, or a row without a key: offline engines): the method is switched
  off for its engine (`report`); the server refuses its requests with a 400 from then on.

Reports are kept in this process and, when the server gave one (`STEERSERVE_STATS_DIR`, shared with the
engine's worker processes), as one small file per method or per faulted request in that directory, so a worker
in another process (the engine core runs in its own) reaches the server too. A row's report is written before
the step that would produce its output finishes, so the server sees it before that output.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("steerserve.faults")

REPORT_DIR = "STEERSERVE_STATS_DIR"  # env: the directory the server shares with the engine's workers
ROW_KEY = "steerserve_request"  # the key in SamplingParams.extra_args that names a row's HTTP request
_LOCAL: dict[str, str] = {}  # method family -> reason, reported in this process
_LOCAL_ROWS: dict[str, str] = {}  # request key -> reason, when there is no shared directory


def report(method: str, reason: str) -> None:
    """Record that `method` (a steering family: "attention", "experts", "iapt") is off, and why. The first
    reason is kept."""
    if method in _LOCAL:
        return
    _LOCAL[method] = reason
    log.error("%s steering is switched OFF in this engine: %s", method, reason)
    where = os.environ.get(REPORT_DIR)
    if where:
        path = Path(where) / f"fault-{method}.txt"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(reason)
        os.replace(tmp, path)


def reported() -> dict[str, str]:
    """Every method switched off so far, in this process or the engine's workers: {method: reason}."""
    found = dict(_LOCAL)
    where = os.environ.get(REPORT_DIR)
    for path in Path(where).glob("fault-*.txt") if where else ():
        found.setdefault(path.stem.removeprefix("fault-"), path.read_text())
    return found


def clear() -> None:
    """Forget every report (a new engine starts clean)."""
    _LOCAL.clear()
    where = os.environ.get(REPORT_DIR)
    for path in Path(where).glob("fault-*.txt") if where else ():
        path.unlink(missing_ok=True)


def row_key(extra_args: dict | None) -> str | None:
    """The request key a row's `extra_args` carries (None: a row no server request owns)."""
    key = (extra_args or {}).get(ROW_KEY)
    return key if isinstance(key, str) and key.isalnum() and len(key) <= 64 else None


def report_row(key: str, reason: str) -> None:
    """Record that the request `key` failed inside the engine and why (the first reason is kept)."""
    log.error("steering failed for one request (%s): %s", key, reason)
    where = os.environ.get(REPORT_DIR)
    if not where:
        _LOCAL_ROWS.setdefault(key, reason)
        return
    path = Path(where) / f"row-{key}.txt"
    if path.exists():
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(reason)
    os.replace(tmp, path)


def row_fault(key: str) -> str | None:
    """Why the request `key` failed inside the engine, or None (one stat of a small file: cheap per delta)."""
    where = os.environ.get(REPORT_DIR)
    if not where:
        return _LOCAL_ROWS.get(key)
    try:
        return (Path(where) / f"row-{key}.txt").read_text()
    except FileNotFoundError:
        return None


def forget_row(key: str) -> None:
    """Drop the request's report (the server has answered it)."""
    _LOCAL_ROWS.pop(key, None)
    where = os.environ.get(REPORT_DIR)
    if where:
        (Path(where) / f"row-{key}.txt").unlink(missing_ok=True)
