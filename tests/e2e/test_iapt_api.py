"""IAPT adapters over HTTP on SmolLM2 (fp32): registered in the same pool as LoRA, chosen by `<base>:<adapter>`,
served tokens and logprobs equal to HF transformers with the same adapter's soft tokens, in concurrent traffic
with LoRA, steered and base requests; rejections and residency.

The adapters here are random (tests/tiny_models.py), so that an adapter that was not applied shows as a different
answer; the trained demo adapter's behaviour is checked where it is built (tests/server/test_iapt_train.py).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from steerserve.steering.iapt import PLACEHOLDER_ID, SOFT_TOKENS, IaptModel, hf_soft_prompts
from tests.conftest import auth
from tests.tiny_models import build_tiny_iapt, build_tiny_llama, build_tiny_lora

MESSAGES = [{"role": "user", "content": "Name three colours of the rainbow."}]
TOLERANCE = 2e-3  # 30 fp32 layers; the unsteered engine vs HF differs by the same order


@pytest.fixture(scope="module")
def dirs(server, smollm2_path, tmp_path_factory) -> dict[str, Path]:
    root = server.adapter_root
    tiny = build_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")
    return {"i0": build_tiny_iapt(root / "iapt-i0", smollm2_path, seed=1),
            "i1": build_tiny_iapt(root / "iapt-i1", smollm2_path, seed=2, bottleneck=8, shared=True),
            "i2": build_tiny_iapt(root / "iapt-i2", smollm2_path, seed=3),
            "lora": build_tiny_lora(root / "iapt-lora", smollm2_path, seed=4, rank=8, std=0.2,
                                    targets=("q_proj", "v_proj")),
            "tiny": build_tiny_iapt(root / "iapt-tiny", tiny, seed=5)}


@pytest.fixture(scope="module")
def ops(server, api_keys):
    with httpx.Client(base_url=server.url, timeout=300, headers=auth(api_keys["ops"])) as client:
        yield client


@pytest.fixture(scope="module")
def registered(ops, dirs) -> list[str]:
    names = []
    for name, kind in (("i0", "iapt"), ("i1", "iapt"), ("i2", "iapt"), ("lora", "lora")):
        r = ops.put(f"/v1/adapters/iapt-test-{name}", params={"scope": "global"},
                    json={"path": str(dirs[name]), "kind": kind})
        assert r.status_code == 200, r.text
        names.append(f"iapt-test-{name}")
    yield names
    for name in names:
        ops.delete(f"/v1/adapters/{name}", params={"scope": "global"})


@pytest.fixture(scope="module")
def hf(smollm2_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32, attn_implementation="eager")
    return model.eval(), AutoTokenizer.from_pretrained(smollm2_path)


def chat(http, model: str, max_tokens: int = 8, **extra) -> httpx.Response:
    return http.post("/v1/chat/completions", json={"model": model, "messages": MESSAGES, "temperature": 0,
                                                   "max_tokens": max_tokens, "logprobs": True, **extra})


def test_registration_says_what_the_adapter_is(registered, http, model_name):
    r = http.get("/v1/adapters/iapt-test-i1")
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["kind"], body["model"], body["shared"], body["bottleneck"]) == \
        ("iapt", f"{model_name}:iapt-test-i1", True, 8)


def test_served_logprobs_match_hf_reference(registered, http, model_name, hf, dirs):
    model, tok = hf
    r = chat(http, f"{model_name}:iapt-test-i0")
    assert r.status_code == 200, r.text
    assert r.headers["x-adapter-applied"] == "iapt-test-i0; scope=global"
    content = r.json()["choices"][0]["logprobs"]["content"]
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = tok.encode(text, add_special_tokens=False) + [PLACEHOLDER_ID] * SOFT_TOKENS
    assert r.json()["usage"]["prompt_tokens"] == len(ids)
    iapt = IaptModel.load(dirs["i0"])
    generated: list[int] = []
    worst = 0.0
    for step, c in enumerate(content):
        with torch.no_grad():
            with hf_soft_prompts(model, iapt, [len(ids) - SOFT_TOKENS]):
                lp = model(torch.tensor([ids + generated])).logits[0, -1].double().log_softmax(-1)
            if step == 0:
                plain = model(torch.tensor([ids])).logits[0, -1].double().log_softmax(-1)
                assert (lp - plain).abs().max() > 0.05, "this adapter barely moves the model; the test would be weak"
        token = int(lp.argmax())
        assert tok.decode([token]) == c["token"], f"step {step}: reference {tok.decode([token])!r}"
        worst = max(worst, abs(c["logprob"] - lp[token].item()))
        generated.append(token)
    assert worst < TOLERANCE, f"max |dlogprob| {worst:.2e}"


def test_concurrent_mixed_traffic_keeps_every_row_its_own(registered, http, model_name):
    """IAPT (two adapters), LoRA, steered and base requests at once give what each gives alone."""
    models = [f"{model_name}:{n}" for n in registered] + [model_name]
    requests = [(m, None) for m in models] + [(model_name, {"logits": {"bias": {"the": 2.0}}}),
                                               (f"{model_name}:iapt-test-i0", {"attention": {"sink": {"gamma": 0.5}}})]

    def run(item):
        m, steering = item
        r = chat(http, m, **({"steering": steering} if steering else {}))
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    alone = [run(item) for item in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(run, requests * 2))
    assert together == alone * 2
    assert len(set(alone[:len(models)])) == len(models), "every adapter (and the base) must answer differently"


def test_rejections(registered, ops, http, model_name, dirs, smollm2_path):
    r = ops.put("/v1/adapters/iapt-test-bad", params={"scope": "global"},
                json={"path": str(dirs["tiny"]), "kind": "iapt"})
    assert r.status_code == 400 and r.json()["error"]["code"] in ("adapter_base_model", "adapter_architecture")
    # A prompt that leaves the base model room for one token, but none once the 4 soft tokens are added.
    context = http.get("/v1/models").json()["data"][0]["max_model_len"]
    ids = [100 + i % 1000 for i in range(context - 2)]
    base = http.post("/v1/completions", json={"model": model_name, "prompt": ids, "max_tokens": 1})
    assert base.status_code == 200, base.text
    r = http.post("/v1/completions", json={"model": f"{model_name}:iapt-test-i0", "prompt": ids, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert "4 soft tokens" in r.json()["error"]["message"] and r.json()["error"]["param"] == "prompt"
    r = http.post("/v1/chat/completions", json={"model": f"{model_name}:iapt-test-i0", "messages": MESSAGES,
                                                "steering": {"prompt": {"urial": {}}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "steering.prompt", r.text


def test_upload_and_residency(registered, http, ops, model_name, dirs, server):
    """An IAPT adapter uploaded as two files serves like one registered by path; the pool counts it resident."""
    files = {name: (name, (dirs["i2"] / name).read_bytes()) for name in ("iapt_config.json",
                                                                         "iapt_model.safetensors")}
    r = http.put("/v1/adapters/mine", files=files)
    assert r.status_code == 200 and r.json()["kind"] == "iapt", r.text
    try:
        uploaded = chat(http, f"{model_name}:mine")
        by_path = chat(http, f"{model_name}:iapt-test-i2")
        assert uploaded.status_code == by_path.status_code == 200
        assert uploaded.json()["choices"][0]["message"] == by_path.json()["choices"][0]["message"]
        assert http.get("/v1/adapters/mine").json()["loaded"] is True
    finally:
        http.delete("/v1/adapters/mine")
    metrics = ops.get("/metrics").text
    assert "steerserve_adapter_loads_total" in metrics


@pytest.fixture(scope="module")
def demo(ops, smollm2_path):
    """The trained demo `ahoy-iapt` (built once into the cache: about 3 minutes of CPU), registered globally."""
    from steerserve.server.adapters.demos import build_iapt_demo
    from steerserve.server.models.store import cache_root

    path = build_iapt_demo(smollm2_path, cache_root() / "adapters", "ahoy-iapt")
    r = ops.put("/v1/adapters/ahoy-iapt", params={"scope": "global"}, json={"path": str(path), "kind": "iapt"})
    assert r.status_code == 200, r.text
    yield
    ops.delete("/v1/adapters/ahoy-iapt", params={"scope": "global"})


def test_trained_demo_shows_its_behaviour_over_http(demo, http, model_name):
    """Held-out questions (in neither training set): with the adapter the answers open with "Ahoy"; the same
    questions to the base model, sent at the same time, get exactly the base model's answers."""
    from steerserve.server.adapters.demos import HELD_OUT

    def answer(item):
        question, model = item
        r = http.post("/v1/chat/completions", json={"model": model, "temperature": 0, "max_tokens": 12,
                                                    "messages": [{"role": "user", "content": question}]})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    questions = HELD_OUT[:8]
    base_alone = [answer((q, model_name)) for q in questions]
    with ThreadPoolExecutor(8) as pool:
        mixed = list(pool.map(answer, [(q, m) for q in questions for m in (f"{model_name}:ahoy-iapt", model_name)]))
    with_adapter, base_mixed = mixed[0::2], mixed[1::2]
    assert base_mixed == base_alone
    assert sum(a.startswith("Ahoy") for a in with_adapter) >= 7, with_adapter
    assert not any(a.startswith("Ahoy") for a in base_alone), base_alone
