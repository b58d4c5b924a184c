"""The artifact store through real servers over real HTTP (a tiny Llama), with `--artifact-store` on a real S3 API
(moto's server on loopback): adapters registered on one server are served by another process with an empty local
cache (the other replica: same database, same store, nothing on its disk), with the same greedy answers; an
artifact corrupted in the store is refused with a clear 400 naming the adapter, and the engine serves on."""
from __future__ import annotations

import shutil

import httpx
import pytest

from tests.conftest import Server
from tests.tiny_models import build_tiny_llama, build_tiny_lora

LORA_FILES = ("adapter_config.json", "adapter_model.safetensors")
STARTUP_S = 600  # a tiny-model start-up takes seconds on a quiet machine and minutes on a crowded one


def greedy(server: Server, model: str) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/completions", timeout=120,
                      json={"model": model, "prompt": "hello world", "max_tokens": 8, "temperature": 0})


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, s3):
    """Server one registers adapter `up` (uploaded) and `byp` (by path) into the S3 store and answers with them;
    it stops, its local cache is wiped and `byp`'s weights are corrupted in S3; server two starts on the same
    database. Yields (server two, the first server's answers, the store URL, the tiny model)."""
    tmp = tmp_path_factory.mktemp("replicas")
    model = build_tiny_llama(tmp / "tiny")
    lora = build_tiny_lora(tmp / "lora", model, rank=4)
    other = build_tiny_lora(tmp / "other", model, rank=4, seed=7)
    url = s3.url()
    data = tmp / "data"
    args = ["--model", str(model), "--dtype", "float32", "--max-model-len", "256", "--kv-cache-gib", "0.1",
            "--max-num-seqs", "4", "--data-dir", str(data), "--enable-lora", "--max-lora-rank", "8",
            "--artifact-store", url]
    first = Server(args, tmp / "first.log", env=s3.env).wait_ready(STARTUP_S)
    try:
        upload = {n: (n, (lora / n).read_bytes()) for n in LORA_FILES}
        r = httpx.put(f"{first.url}/v1/adapters/up", files=upload, timeout=60)
        assert r.status_code == 200, r.text
        r = httpx.put(f"{first.url}/v1/adapters/byp", json={"path": str(other)}, timeout=60)
        assert r.status_code == 200, r.text
        answers = {}
        for name in ("up", "byp"):
            r = greedy(first, f"{model.name}:{name}")
            assert r.status_code == 200, r.text
            answers[name] = r.json()["choices"][0]["text"]
    finally:
        first.stop()
    fs = s3.fs()
    stored = fs.find(f"{url}/adapters".removeprefix("s3://"))
    assert len(stored) == 4 and not [k for k in stored if ".tmp-" in k], stored  # two adapters, no temp keys
    shutil.rmtree(data / "adapters")  # the other replica: nothing on its disk
    weights = next(k for k in stored if k.endswith("adapter_model.safetensors") and
                   fs.cat_file(k) == (other / "adapter_model.safetensors").read_bytes())
    flipped = bytearray(fs.cat_file(weights))
    flipped[-1] ^= 1  # still a valid safetensors file: only the checksum tells
    fs.pipe_file(weights, bytes(flipped))
    second = Server(args, tmp / "second.log", env=s3.env).wait_ready(STARTUP_S)
    try:
        yield second, answers, model
    finally:
        second.stop()


def test_an_adapter_uploaded_on_one_replica_serves_on_another(replicas):
    server, answers, model = replicas
    listed = {a["name"]: a for a in httpx.get(f"{server.url}/v1/adapters", timeout=10).json()["data"]}
    assert set(listed) == {"up", "byp"} and listed["up"]["source"] == "upload"
    r = greedy(server, f"{model.name}:up")
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == answers["up"]


def test_an_adapter_corrupted_in_the_store_fails_closed(replicas):
    server, _, model = replicas
    r = greedy(server, f"{model.name}:byp")
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "model" and "byp" in error["message"] and "sha256" in error["message"], error
    assert greedy(server, f"{model.name}:up").status_code == 200
    assert httpx.get(f"{server.url}/ready", timeout=10).status_code == 200
