"""tests/replicas/: the in-process fixtures of tests/http (a fake engine) for the forwarding tests, and one Ray
Serve deployment of 2 SmolLM2 replicas per test session (`replicas`), started and stopped here."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.http.conftest import anyio_backend, served, tokenizer  # noqa: F401 - fixtures

START_TIMEOUT_S = 600  # two engines starting at once on 2 shared cores


@dataclass
class Replicas:
    url: str
    settings: object
    adapter_root: Path

    def board(self) -> dict[str, dict]:
        """Each live replica's latest report (pid, ready, metrics), by replica id."""
        import ray

        from steerserve.server.replicas.deployment import board

        return ray.get(board().fresh.remote())


@pytest.fixture(scope="session")
def replicas(smollm2_path: Path, api_keys, tmp_path_factory) -> Replicas:
    """`steerserve serve --replicas 2` on SmolLM2 (fp32, LoRA on with 2 slots), started in this process as the
    CLI starts it (server/replicas/launch.py), with keys; the Ray cluster is stopped at the end of the session."""
    from steerserve.server.replicas import launch
    from steerserve.server.replicas.replica_settings import prepare
    from steerserve.server.settings import Settings

    # Ray's memory monitor kills workers when the whole machine is short of memory, whoever uses it: on a shared
    # test machine that would be other processes' doing. Off for the test cluster (read when Ray starts).
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    state = tmp_path_factory.mktemp("replicas")
    (state / "adapters").mkdir()
    settings = prepare(Settings(
        model=str(smollm2_path), port=free_port(), replicas=2, replica_cpus=1, dtype="float32", max_model_len=1024,
        max_num_seqs=8, kv_cache_gib=0.25, api_keys=Path(api_keys["file"]), data_dir=state / "data",
        enable_lora=True, max_loras=2, max_lora_rank=8, max_cpu_loras=2, adapter_root=state / "adapters",
        log_level="warning", shutdown_timeout=2))
    began = time.monotonic()
    launch.start(settings)
    url = f"http://127.0.0.1:{settings.port}"
    while httpx.get(f"{url}/ready", timeout=30).status_code != 200:
        assert time.monotonic() - began < START_TIMEOUT_S, "the replicas did not become ready"
        time.sleep(0.5)
    print(f"2 replicas ready in {time.monotonic() - began:.1f} s")
    try:
        yield Replicas(url, settings, state / "adapters")
    finally:
        launch.stop()
