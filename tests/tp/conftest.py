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


@pytest.fixture(autouse=True, scope="module")
def _kv_cache_as_asked():
    """vLLM-CPU's legacy `VLLM_CPU_KVCACHE_SPACE` (whole GiB, set by tests/conftest.py) overrides an engine's
    `kv_cache_memory_bytes`, and every rank allocates it: drop it here, so each rank of a TP engine holds only the
    small cache the test asks for (2 GiB less per engine on a 2-core machine that may be short of memory)."""
    saved = os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    yield
    if saved is not None:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = saved
