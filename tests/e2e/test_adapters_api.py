"""The adapter pool end to end on SmolLM2: registry routes, validation, tenants, per-request adapters mixed with
steering, churn through a pool smaller than the working set, and the metrics.

The shared server runs with --max-loras 2 --max-cpu-loras 2 (tests/conftest.py), so three adapters already
evict each other. Exactness against HF + PEFT is tested on a tiny model (tests/server/test_lora_engine_tiny.py);
here the adapters are random, so that an adapter that was not applied shows as a different answer.
"""
from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import auth
from tests.tiny_models import build_tiny_llama, build_tiny_lora

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def adapter_dirs(server, smollm2_path, tmp_path_factory) -> dict[str, Path]:
    """Random LoRAs for SmolLM2 in alice's directory of the server's --adapter-root (each tenant registers by
    path only inside `<root>/<tenant>/`), plus broken ones for the validation tests."""
    root = server.adapter_root / "alice"
    dirs = {f"r{i}": build_tiny_lora(root / f"r{i}", smollm2_path, seed=10 + i, rank=8, std=0.05,
                                     targets=("q_proj", "v_proj")) for i in range(4)}
    dirs["rank16"] = build_tiny_lora(root / "rank16", smollm2_path, seed=20, rank=16, std=0.05,
                                     targets=("q_proj",))
    dirs["lm_head"] = build_tiny_lora(root / "lm_head", smollm2_path, seed=21, rank=4, std=0.05,
                                      targets=("q_proj", "lm_head"))
    tiny = build_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")
    dirs["other_base"] = build_tiny_lora(root / "other_base", tiny, seed=22, rank=4, targets=("q_proj",))
    dirs["other_shapes"] = root / "other_shapes"  # claims SmolLM2, has the tiny model's shapes
    shutil.copytree(dirs["other_base"], dirs["other_shapes"], dirs_exist_ok=True)
    config = json.loads((dirs["other_shapes"] / "adapter_config.json").read_text())
    (dirs["other_shapes"] / "adapter_config.json").write_text(json.dumps({**config,
                                                                         "base_model_name_or_path": str(smollm2_path)}))
    dirs["truncated"] = root / "truncated"
    shutil.copytree(dirs["r0"], dirs["truncated"], dirs_exist_ok=True)
    weights = dirs["truncated"] / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    dirs["no_weights"] = root / "no_weights"
    dirs["no_weights"].mkdir(exist_ok=True)
    shutil.copy(dirs["r0"] / "adapter_config.json", dirs["no_weights"])
    return dirs


@pytest.fixture(scope="module")
def clients(server, api_keys):
    made = {who: httpx.Client(base_url=server.url, timeout=300, headers=auth(api_keys[who]))
            for who in ("alice", "bob", "ops")}
    yield made
    for c in made.values():
        c.close()


def register(client, name, path, scope=None):
    return client.put(f"/v1/adapters/{name}", json={"path": str(path)}, params={"scope": scope} if scope else None)


def chat(client, model, headers=None, steering=None, max_tokens=8):
    body = {"model": model, "messages": PROMPT, "temperature": 0, "max_tokens": max_tokens}
    if steering:
        body["steering"] = steering
    return client.post("/v1/chat/completions", json=body, headers=headers or {})


def answer(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def registered(clients, adapter_dirs):
    for i in range(3):
        r = register(clients["alice"], f"r{i}", adapter_dirs[f"r{i}"])
        assert r.status_code == 200, r.text
    return ["r0", "r1", "r2"]


def test_registry_lists_and_inspects_own_adapters(clients, registered, model_name):
    listed = clients["alice"].get("/v1/adapters").json()["data"]
    assert {a["name"] for a in listed} >= set(registered)
    one = clients["alice"].get("/v1/adapters/r0").json()
    assert one["rank"] == 8 and one["target_modules"] == ["q_proj", "v_proj"] and one["scope"] == "tenant"
    assert one["model"] == f"{model_name}:r0" and one["kind"] == "lora"
    ids = {m["id"] for m in clients["alice"].get("/v1/models").json()["data"]}
    assert f"{model_name}:r0" in ids


def test_adapter_changes_the_answer_and_says_so(clients, registered, model_name):
    base = answer(chat(clients["alice"], model_name))
    r = chat(clients["alice"], f"{model_name}:r0")
    assert answer(r) != base
    assert r.json()["model"] == f"{model_name}:r0"
    assert r.headers["x-adapter-applied"] == "r0; scope=tenant"
    # the same adapter by header, and both spellings agreeing
    by_header = chat(clients["alice"], model_name, headers={"X-Adapter": "r0"})
    assert answer(by_header) == answer(r) and by_header.json()["model"] == f"{model_name}:r0"
    assert answer(chat(clients["alice"], f"{model_name}:r0", headers={"X-Adapter": "r0"})) == answer(r)
    conflict = chat(clients["alice"], f"{model_name}:r0", headers={"X-Adapter": "r1"})
    assert conflict.status_code == 400 and conflict.json()["error"]["param"] == "X-Adapter"
    # base requests carry no adapter header
    assert "x-adapter-applied" not in chat(clients["alice"], model_name).headers


def test_adapter_combines_with_steering_and_streaming(clients, registered, model_name):
    plain = answer(chat(clients["alice"], f"{model_name}:r1", max_tokens=4))
    steered = chat(clients["alice"], f"{model_name}:r1", steering={"logits": {"bias": {" Paris": 100.0}}},
                   max_tokens=4)
    assert answer(steered) == " Paris" * 4 != plain
    assert steered.headers["x-steering-applied"].endswith("methods=logits.bias")
    with clients["alice"].stream("POST", "/v1/chat/completions", json={
            "model": f"{model_name}:r1", "messages": PROMPT, "temperature": 0, "max_tokens": 4, "stream": True}) as s:
        assert s.headers["x-adapter-applied"] == "r1; scope=tenant"
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == plain
    assert {c["model"] for c in chunks} == {f"{model_name}:r1"}


def test_other_tenants_adapters_are_404(clients, registered, model_name):
    r = chat(clients["bob"], f"{model_name}:r0")
    assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found"
    assert chat(clients["bob"], model_name, headers={"X-Adapter": "r0"}).status_code == 404
    assert clients["bob"].get("/v1/adapters/r0").status_code == 404
    assert clients["bob"].delete("/v1/adapters/r0").status_code == 404
    assert "r0" not in {a["name"] for a in clients["bob"].get("/v1/adapters").json()["data"]}
    assert f"{model_name}:r0" not in {m["id"] for m in clients["bob"].get("/v1/models").json()["data"]}


@pytest.mark.parametrize("which, check", [
    ("rank16", "rank"), ("lm_head", "target_modules"), ("other_base", "base_model"),
    ("other_shapes", "base_model"), ("truncated", "files"), ("no_weights", "files")])
def test_registration_rejects_with_the_failed_check(clients, adapter_dirs, which, check):
    r = register(clients["ops"], f"bad-{which}", adapter_dirs[which])
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == f"adapter_{check}", r.json()
    assert clients["ops"].get(f"/v1/adapters/bad-{which}").status_code == 404


def test_users_register_by_path_only_under_the_adapter_root(clients, smollm2_path, adapter_dirs):
    assert register(clients["bob"], "outside", smollm2_path).status_code == 403
    assert register(clients["bob"], "alices", adapter_dirs["r0"]).status_code == 403  # another tenant's directory
    missing = register(clients["bob"], "missing", "/nonexistent/adapter")
    assert missing.status_code == 403  # outside the root: no probing of the server's file system


def test_upload_and_delete(clients, adapter_dirs, model_name):
    files = {name: (name, (adapter_dirs["r3"] / name).read_bytes()) for name in
             ("adapter_config.json", "adapter_model.safetensors")}
    r = clients["bob"].put("/v1/adapters/mine", files=files)
    assert r.status_code == 200, r.text
    assert r.json()["source"] == "upload"
    uploaded = answer(chat(clients["bob"], f"{model_name}:mine"))
    assert register(clients["alice"], "r3", adapter_dirs["r3"]).status_code == 200
    assert answer(chat(clients["alice"], f"{model_name}:r3")) == uploaded  # same files, same answer
    assert clients["bob"].delete("/v1/adapters/mine").status_code == 200
    assert chat(clients["bob"], f"{model_name}:mine").status_code == 404
    broken = clients["bob"].put("/v1/adapters/broken", files={"adapter_config.json": files["adapter_config.json"]})
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "adapter_files"


def test_global_adapters_are_admin_managed(clients, adapter_dirs, model_name):
    assert register(clients["alice"], "shared", adapter_dirs["r2"], scope="global").status_code == 403
    r = register(clients["ops"], "shared", adapter_dirs["r2"], scope="global")
    assert r.status_code == 200 and r.json()["scope"] == "global"
    for who in ("alice", "bob"):
        r = chat(clients[who], f"{model_name}:shared")
        assert r.headers["x-adapter-applied"] == "shared; scope=global"
    assert answer(chat(clients["bob"], f"{model_name}:shared")) == answer(chat(clients["alice"],
                                                                                 f"{model_name}:r2"))


def test_churn_through_a_small_pool_never_fails_a_request(clients, registered, model_name):
    """Four adapters and the base model at once, with 2 slots and 2 resident adapters: requests for cold adapters
    wait, evictions happen, and every answer equals the one its adapter gives alone."""
    models = [model_name] + [f"{model_name}:r{i}" for i in range(3)] + [f"{model_name}:shared"]
    before = metrics(clients["ops"])
    # one after another, each adapter's load is seen to evict one loaded before (2 resident); the concurrent
    # churn below also loads and evicts, partly inside engine steps where the counters cannot see it
    alone = {m: answer(chat(clients["alice"], m)) for m in models}
    with ThreadPoolExecutor(len(models) * 3) as pool:
        results = list(pool.map(lambda m: (m, chat(clients["alice"], m)), models * 3))
    for m, r in results:
        assert answer(r) == alone[m], m
    after = metrics(clients["ops"])
    assert after["steerserve_adapter_loads_total"] > before["steerserve_adapter_loads_total"]
    assert after["steerserve_adapter_evictions_total"] > before["steerserve_adapter_evictions_total"]
    assert after["steerserve_adapters_loaded"] <= 2


def metrics(client) -> dict[str, float]:
    out = {}
    for line in client.get("/metrics").text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_report_the_pool(clients, registered, model_name):
    chat(clients["alice"], f"{model_name}:r0")
    text = clients["ops"].get("/metrics").text
    assert 'steerserve_adapter_requests_total{adapter="r0",scope="tenant",tenant="alice"}' in text
    assert "steerserve_adapter_load_seconds_count" in text
    assert "steerserve_adapters_active 0.0" in text
    info = [line for line in text.splitlines() if line.startswith("vllm:lora_requests_info{")]
    assert len(info) == 1 and 'max_lora="2"' in info[0] and 'running_lora_adapters=""' in info[0]
