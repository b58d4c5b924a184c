"""Two real `steerserve serve` processes on one PostgreSQL database (`--database-url`), as two replicas: a profile,
a tenant switch, a URIAL prefix and an adapter registered through one are served by the other at once (read-through,
no restart), and each replica's engine ids come from the one database. Tiny Llama + tiny LoRA keep the two starts
quick (about a minute on 2 cores); the adapter files sit in the one shared data dir (files are not this test's
subject)."""
from __future__ import annotations

import httpx

from tests.conftest import Server
from tests.stores.conftest import reset_postgres
from tests.tiny_models import build_tiny_llama, build_tiny_lora


def test_what_one_replica_registers_the_other_serves(tmp_path, postgres_url) -> None:
    reset_postgres(postgres_url)
    model = build_tiny_llama(tmp_path / "tiny")
    lora = build_tiny_lora(tmp_path / "lora", model, rank=4)
    args = ["--model", str(model), "--dtype", "float32", "--max-model-len", "256", "--kv-cache-gib", "0.1",
            "--data-dir", str(tmp_path / "data"), "--enable-lora", "--max-lora-rank", "8",
            "--database-url", postgres_url]
    spec = {"logits": {"bias": {"7": 3.5}}}
    a = Server(args, tmp_path / "a.log")
    b = Server(args, tmp_path / "b.log")
    try:
        a.wait_ready(), b.wait_ready()
        assert httpx.get(f"{b.url}/v1/steering/profiles/shared").status_code == 404
        assert httpx.put(f"{a.url}/v1/steering/profiles/shared", json=spec).status_code == 200
        assert httpx.get(f"{b.url}/v1/steering/profiles/shared").json() == {"name": "shared", "spec": spec}
        r = httpx.post(f"{b.url}/v1/completions", headers={"X-Steering-Profile": "shared"},
                       json={"model": model.name, "prompt": "hello", "max_tokens": 2})
        assert r.status_code == 200 and r.headers["x-steering-applied"].endswith("logits.bias")

        assert httpx.put(f"{a.url}/v1/tenants/default/settings", json={"allow_conjugate": True}).status_code == 200
        assert httpx.get(f"{b.url}/v1/tenants/default/settings").json()["allow_conjugate"] is True
        assert httpx.put(f"{a.url}/v1/steering/urial/prefixes/mine", content="# Query:\nhi",
                         headers={"content-type": "text/plain"}).status_code == 200
        assert httpx.get(f"{b.url}/v1/steering/urial/prefixes/mine").json()["text"] == "# Query:\nhi"

        registered = httpx.put(f"{a.url}/v1/adapters/ad", json={"path": str(lora)})
        assert registered.status_code == 200, registered.text
        assert httpx.get(f"{b.url}/v1/adapters/ad").json()["rank"] == 4
        adapted = {"model": f"{model.name}:ad", "prompt": "hello", "max_tokens": 4, "temperature": 0}
        on_a = httpx.post(f"{a.url}/v1/completions", json=adapted, timeout=120)
        on_b = httpx.post(f"{b.url}/v1/completions", json=adapted, timeout=120)
        assert on_a.status_code == on_b.status_code == 200, on_b.text
        assert on_a.json()["choices"][0]["text"] == on_b.json()["choices"][0]["text"]  # same adapter, greedy
        assert httpx.delete(f"{b.url}/v1/adapters/ad").status_code == 200
        assert httpx.post(f"{a.url}/v1/completions", json=adapted).status_code == 404
    finally:
        a.stop()
        b.stop()
