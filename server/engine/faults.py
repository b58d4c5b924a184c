"""Faults of the engine-side steering hooks: a hook that cannot apply its method never raises inside the engine
step (that would kill the engine, and every tenant's requests with it). It switches its method off for its
engine and reports why; the server reads the reports and refuses the method's requests with a 400 from then on.

Reports are kept in this process and, when the server gave one (`STEERSERVE_STATS_DIR`, shared with the
engine's worker processes), as one small file per method in that directory, so a worker in another process
reaches the server too.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("steerserve.faults")

REPORT_DIR = "STEERSERVE_STATS_DIR"  # env: the directory the server shares with the engine's workers
_LOCAL: dict[str, str] = {}  # method family -> reason, reported in this process


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
