"""Tensor-parallel engines in tests: two CPU ranks, one core each. vLLM spawns one worker process per rank (the
engine core stays in the test process, tests/conftest.py), and our plugin loads in each (server/engine/tp.py)."""
from __future__ import annotations

import os

import pytest

TP = 2


def pytest_collection_modifyitems(config, items):
    if len(os.sched_getaffinity(0)) >= TP:
        return
    skip = pytest.mark.skip(reason=f"tensor parallelism on CPU needs {TP} cores (one per rank)")
    for item in items:
        if "tests/tp/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip)
