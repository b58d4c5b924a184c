"""Server state that must survive a restart: steering profiles and adapters (a tiny model keeps the two starts
quick)."""
from __future__ import annotations

import httpx

from tests.conftest import Server
from tests.tiny_models import build_tiny_llama, build_tiny_lora


def test_profiles_and_adapters_survive_a_restart(tmp_path):
    model = build_tiny_llama(tmp_path / "tiny")
    lora = build_tiny_lora(tmp_path / "lora", model, rank=4)
    args = ["--model", str(model), "--dtype", "float32", "--max-model-len", "256", "--kv-cache-gib", "0.1",
            "--data-dir", str(tmp_path / "data"), "--enable-lora", "--max-lora-rank", "8"]
    adapted = {"model": f"{model.name}:kept", "prompt": "hello", "max_tokens": 4, "temperature": 0}
    spec = {"logits": {"bias": {"7": 3.5}, "rules": {"diversity": 0.5}}}

    first = Server(args, tmp_path / "first.log").wait_ready()
    try:
        # open mode (no keys): every request is the "default" tenant
        assert httpx.put(f"{first.url}/v1/steering/profiles/kept", json=spec).status_code == 200
        assert httpx.put(f"{first.url}/v1/steering/profiles/dropped", json=spec).status_code == 200
        assert httpx.delete(f"{first.url}/v1/steering/profiles/dropped").status_code == 200
        for name in ("kept", "dropped"):
            assert httpx.put(f"{first.url}/v1/adapters/{name}", json={"path": str(lora)}).status_code == 200
        assert httpx.delete(f"{first.url}/v1/adapters/dropped").status_code == 200
        before = httpx.post(f"{first.url}/v1/completions", json=adapted).json()["choices"][0]["text"]
    finally:
        first.stop()

    second = Server(args, tmp_path / "second.log").wait_ready()
    try:
        assert httpx.get(f"{second.url}/v1/steering/profiles/kept").json() == {"name": "kept", "spec": spec}
        assert httpx.get(f"{second.url}/v1/steering/profiles/dropped").status_code == 404
        r = httpx.post(f"{second.url}/v1/completions", headers={"X-Steering-Profile": "kept"},
                       json={"model": model.name, "prompt": "hello", "max_tokens": 2})
        assert r.status_code == 200 and r.headers["x-steering-applied"].endswith("logits.bias,logits.rules")
        assert httpx.get(f"{second.url}/v1/adapters/kept").json()["rank"] == 4
        assert httpx.get(f"{second.url}/v1/adapters/dropped").status_code == 404
        r = httpx.post(f"{second.url}/v1/completions", json=adapted)
        assert r.headers["x-adapter-applied"] == "kept; scope=tenant" and r.json()["choices"][0]["text"] == before
    finally:
        second.stop()
