"""Attention steering over HTTP on SmolLM2 (fp32): the served tokens and logprobs equal HF transformers eager
attention with the same steering on the same weights, for sink scaling and for chat-role span steering."""
from __future__ import annotations

import pytest

from tests import attention_reference as reference

LAYERS, HEADS = 30, 9
MESSAGES = [{"role": "system", "content": "You are a terse assistant. Answer in one sentence."},
            {"role": "user", "content": "Which planet is known as the red planet, and why?"}]
SPECS = {
    "sink": {"sink": {"gamma": 0.2, "layers": list(range(0, 30, 2)), "per_head": {"1.4": 5.0}}},
    "user_span": {"spans": [{"target": "user", "alpha": 0.3}]},
    "both": {"sink": {"gamma": 3.0, "heads": [0, 4, 8]}, "spans": [{"target": "system", "alpha": 0.5,
                                                                     "layers": [3, 4, 5]}]},
    "lssar": {"mode": {"kind": "lssar", "power": 3.0, "layers": [20, 21]}, "sink": {"gamma": 2.0}},
}
TOLERANCE = 2e-3  # 30 fp32 layers; the unsteered engine vs HF differs by the same order


@pytest.fixture(scope="module")
def hf(smollm2_path):
    from transformers import AutoTokenizer

    return reference.load(smollm2_path), AutoTokenizer.from_pretrained(smollm2_path)


def role_spans(tok, messages) -> tuple[list[int], dict[str, list[tuple[int, int]]]]:
    """Prompt ids and each role's content token range, found by tokenizing the rendered text up to each content's
    start and end (ChatML puts a newline before and a special token after each content, so no merge crosses)."""
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok.encode(text, add_special_tokens=False)
    spans: dict[str, list[tuple[int, int]]] = {}
    for m in messages:
        start = text.index(m["content"])
        a = len(tok.encode(text[:start], add_special_tokens=False))
        b = len(tok.encode(text[: start + len(m["content"])], add_special_tokens=False))
        spans.setdefault(m["role"], []).append((a, b))
    return ids, spans


def served(http, model_name, spec):
    body = {"model": model_name, "messages": MESSAGES, "temperature": 0, "max_tokens": 8, "logprobs": True}
    if spec is not None:
        body["steering"] = {"attention": spec}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r


@pytest.mark.parametrize("name", list(SPECS))
def test_served_logprobs_match_hf_reference(http, model_name, hf, name):
    model, tok = hf
    spec = SPECS[name]
    r = served(http, model_name, spec)
    methods, *experimental = r.headers["x-steering-applied"].split("; ")[1:]
    assert methods == "methods=" + ",".join(f"attention.{m}" for m in sorted(spec))
    assert experimental == (["experimental=attention.mode"] if "mode" in spec else [])
    content = r.json()["choices"][0]["logprobs"]["content"]
    ids, spans = role_spans(tok, MESSAGES)
    bias = reference.reference_bias(spec, len(ids), LAYERS, HEADS, spans)
    plain = reference.logprobs(model, ids, [], reference.reference_bias(None, len(ids), LAYERS, HEADS))
    # Greedy decoding in the reference, token by token; the server's tokens come back as text, so compare texts.
    generated: list[int] = []
    worst = 0.0
    for step, c in enumerate(content):
        lp = reference.logprobs(model, ids, generated, bias, spec.get("mode"))[-1]
        if step == 0:
            assert (lp - plain[0]).abs().max() > 0.05, "this steering barely moves the model; the test would be weak"
        token = int(lp.argmax())
        assert tok.decode([token]) == c["token"], f"{name} step {step}: reference {tok.decode([token])!r}"
        worst = max(worst, abs(c["logprob"] - lp[token].item()))
        generated.append(token)
    assert worst < TOLERANCE, f"{name}: max |dlogprob| {worst:.2e}"


def test_steered_and_unsteered_requests_do_not_share_kv(http, model_name):
    first = served(http, model_name, None).json()
    served(http, model_name, SPECS["sink"])  # same prompt, steered: must not reuse (or pollute) the cached prefix
    again = served(http, model_name, None).json()
    assert again["choices"][0]["logprobs"] == first["choices"][0]["logprobs"]


@pytest.mark.parametrize("spec, field, says", [
    ({"sink": {"layers": [30]}}, "steering.attention.sink.layers", "30 layers"),
    ({"spans": [{"target": "assistant", "alpha": 0.5}]}, "steering.attention.spans.0.target", "no assistant"),
    ({"spans": [{"target": {"start": 500, "end": 600}, "alpha": 0.5}]}, "steering.attention.spans.0.target",
     "matches no token"),
])
def test_unappliable_attention_steering_is_400(http, model_name, spec, field, says):
    r = http.post("/v1/chat/completions", json={"model": model_name, "messages": MESSAGES, "max_tokens": 1,
                                                "steering": {"attention": spec}})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field and says in r.json()["error"]["message"]


def test_role_targets_are_refused_on_completions(http, model_name):
    r = http.post("/v1/completions", json={"model": model_name, "prompt": "Hello there", "max_tokens": 1,
                                           "steering": {"attention": {"spans": [{"target": "user", "alpha": 0.5}]}}})
    assert r.status_code == 400 and "needs /v1/chat/completions" in r.json()["error"]["message"]
