"""Expert steering over HTTP on a tiny random fp32 Mixtral (its own server): the start-up self-test passes, the
served logprobs equal the HF reference with the same masks, refusals are 400s naming the field, and
`steering_stats.routed_experts` returns per-layer counts consistent with the routing."""
from __future__ import annotations

import httpx
import pytest

from tests import experts_reference as reference
from tests.conftest import SERVER_ARGS, Server
from tests.tiny_models import build_tiny_moe

PROMPT = "You may convey a work based on the Program"
TOP_K, EXPERTS, LAYERS = 2, 8, (0, 1)


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    path = build_tiny_moe(tmp_path_factory.mktemp("moe") / "tiny-mixtral", "mixtral")
    state = tmp_path_factory.mktemp("moe-server")
    srv = Server(["--model", str(path), *SERVER_ARGS, "--data-dir", str(state / "data")], state / "server.log")
    try:
        srv.wait_ready()
        with httpx.Client(base_url=srv.url, timeout=120) as client:
            yield client, path
    finally:
        srv.stop()


def complete(client, steering=None, headers=None, **extra):
    body = {"model": "tiny-mixtral", "prompt": PROMPT, "temperature": 0, "max_tokens": 5, "logprobs": 0,
            "ignore_eos": True, **extra}
    if steering is not None:
        body["steering"] = {"experts": steering}
    return client.post("/v1/completions", json=body, headers=headers or {})


@pytest.mark.parametrize("spec", [{"off": ["0.0", "0.3", "1.5"]}, {"on": ["1.6"], "on_mode": "dominant"}])
def test_served_logprobs_match_the_reference_and_stats_count_the_routing(moe, spec):
    client, path = moe
    r = complete(client, spec, steering_stats={"routed_experts": True})
    assert r.status_code == 200, r.text
    assert r.headers["x-steering-applied"].endswith("methods=" + ",".join(f"experts.{m}" for m in ("off", "on")
                                                                          if m in spec))
    body = r.json()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(PROMPT).input_ids
    lp = body["choices"][0]["logprobs"]
    model, generated = reference.load(path, "mixtral"), []
    for got in lp["token_logprobs"]:  # the reference's own greedy path, token by token
        step = reference.logprobs(model, ids, generated, spec)[-1]
        generated.append(int(step.argmax()))
        assert abs(got - step[generated[-1]].item()) < 1e-4
    assert tok.decode(generated) == body["choices"][0]["text"]
    counts = body["steering_stats"]["routed_experts"]
    assert set(counts) == {"0", "1"}
    for layer in LAYERS:  # every token run through the model (not the last sampled one) selects top-k experts
        assert sum(counts[str(layer)]) == TOP_K * (len(ids) + len(generated) - 1)
    for pair in spec.get("off", []):
        layer, expert = pair.split(".")
        assert counts[layer][int(expert)] == 0
    for pair in spec.get("on", []):
        layer, expert = pair.split(".")
        assert counts[layer][int(expert)] == len(ids) + len(generated) - 1
    plain = complete(client, None, headers={"X-Steering-Stats": "routed_experts"}).json()
    assert plain["choices"][0]["logprobs"]["token_logprobs"] != lp["token_logprobs"]
    assert sum(plain["steering_stats"]["routed_experts"]["1"]) == sum(counts["1"])


@pytest.mark.parametrize("spec, extra, field, words", [
    ({"off": ["2.0"]}, {}, "steering.experts.off.0", "decoder layer 2 has no routed experts"),
    ({"off": ["1.8"]}, {}, "steering.experts.off.0", "out of range"),
    ({"off": ["1.1"], "on": ["1.1"]}, {}, "steering.experts.on", "both on and off"),
    ({"off_mode": "zero"}, {}, "steering.experts.off_mode", ""),
    (None, {"steering_stats": {"routed_experts": True}, "stream": True}, "steering_stats.routed_experts",
     "non-streaming"),
])
def test_refusals_name_the_field(moe, spec, extra, field, words):
    r = complete(moe[0], spec, **extra)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and words in err["message"]
