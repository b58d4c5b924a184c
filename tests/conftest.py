"""Shared fixtures: one real steerserve server on SmolLM2 per test session, and the settings vLLM needs in tests."""
from __future__ import annotations

import os

# In-process vLLM workers with one OMP thread: ~10x faster start-up and no oversubscription on 2 cores.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

SERVER_ARGS = ["--dtype", "float32", "--max-model-len", "1024", "--max-num-seqs", "16", "--kv-cache-gib", "0.5"]
# Tool calling on the shared server: SmolLM2's template with tools (renders chats without tools exactly as the
# model's own template: tests/server/test_chat_templates.py) and vLLM's hermes parser.
TOOL_ARGS = ["--chat-template", "smollm2-tools", "--tool-call-parser", "hermes"]
# LoRA on the shared server: two batch slots and two resident adapters, so three adapters already churn.
LORA_ARGS = ["--enable-lora", "--max-loras", "2", "--max-lora-rank", "8", "--max-cpu-loras", "2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `steerserve serve` child process on 127.0.0.1."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.adapter_root: Path | None = None  # where users may register adapters by path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "steerserve.server", "serve", "--port", str(self.port), *args],
            stdout=log_path.open("w"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
            start_new_session=True)

    def wait_ready(self, timeout: float = 300) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from steerserve.server.models.store import fetch_smollm2

    return fetch_smollm2()


@pytest.fixture(scope="session")
def api_keys(tmp_path_factory) -> dict[str, str]:
    """A key file with an admin, two tenants, a metrics scraper and the fuzzer's tenant; returns the keys by who
    holds them."""
    from steerserve.server.http.auth import add_key

    path = tmp_path_factory.mktemp("keys") / "keys.yaml"
    keys = {"ops": add_key(path, "ops", "admin"), "alice": add_key(path, "alice", "user"),
            "bob": add_key(path, "bob", "user"), "scraper": add_key(path, "ops", "metrics"),
            "fuzz": add_key(path, "fuzz", "user")}  # the API fuzzer's tenant (tests/reliability/test_schemathesis.py)
    keys["file"] = str(path)
    return keys


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="session")
def server(smollm2_path: Path, api_keys, tmp_path_factory) -> Server:
    """The real server on SmolLM2 (fp32, so greedy answers are exact), shared by every end-to-end test.
    Tenants: `alice` and `bob` (users), `ops` (admin). Chat tools through the hermes parser (TOOL_ARGS)."""
    state = tmp_path_factory.mktemp("server")
    adapter_root = state / "adapters"
    adapter_root.mkdir()
    srv = Server(["--model", str(smollm2_path), *SERVER_ARGS, *LORA_ARGS, *TOOL_ARGS, "--api-keys", api_keys["file"],
                  "--data-dir", str(state / "data"), "--adapter-root", str(adapter_root)], state / "server.log")
    srv.adapter_root = adapter_root
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def model_name(server: Server, api_keys) -> str:
    return httpx.get(f"{server.url}/v1/models", headers=auth(api_keys["alice"])).json()["data"][0]["id"]


@pytest.fixture(scope="session")
def openai_client(server: Server, api_keys):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=api_keys["alice"], max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def http(server: Server, api_keys):
    """An HTTP client acting as tenant alice."""
    with httpx.Client(base_url=server.url, timeout=120, headers=auth(api_keys["alice"])) as client:
        yield client


@pytest.fixture(scope="module")
def steering_llms():
    """Builds this module's offline steering engines: `steering_llms(model, **engine_kwargs)` is a `vllm.LLM` with
    steerserve's plugin hooks and steering processor (server/engine/builder.py: `steering_llm`), the engine
    arguments passed as given. After the module every engine is dropped and the hooks unregistered, so later
    modules' engines get plain vLLM."""
    from contextlib import ExitStack

    from steerserve.server.engine.builder import steering_llm

    with ExitStack() as engines:
        yield lambda model, **engine_kwargs: engines.enter_context(steering_llm(model, **engine_kwargs))
