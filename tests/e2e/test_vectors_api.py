"""Control vectors over HTTP on SmolLM2 (fp32, the shared session server): served tokens and logprobs equal HF
transformers eager with forward hooks applying the same inline vectors (tests/vectors_reference.py), for add,
ablate and generated-only items; X-Steering-Applied names them; bad items are 400s naming the field."""
from __future__ import annotations

import numpy as np
import pytest

from tests import attention_reference as reference
from tests.vectors_reference import steered

HIDDEN, LAYERS, HEADS = 576, 30, 9
MESSAGES = [{"role": "user", "content": "Write one sentence about the sea."}]
RNG = np.random.default_rng(7)
V = {str(layer): (RNG.standard_normal(HIDDEN) * 0.25).round(5).tolist() for layer in (6, 12, 18)}
SPECS = {
    "add": [{"data": V, "scale": 10.0}],
    "ablate_and_generated": [{"data": V, "mode": "ablate", "layers": [12]},
                             {"data": V, "normalize": True, "scale": 150.0, "layers": [18], "tokens": "generated"}],
}
TOLERANCE = 2e-3  # 30 fp32 layers; the unsteered engine vs HF differs by the same order


@pytest.fixture(scope="module")
def hf(smollm2_path):
    from transformers import AutoTokenizer

    return reference.load(smollm2_path), AutoTokenizer.from_pretrained(smollm2_path)


def served(http, model_name, vectors):
    body = {"model": model_name, "messages": MESSAGES, "temperature": 0, "max_tokens": 8, "logprobs": True}
    if vectors is not None:
        body["steering"] = {"vectors": vectors}
    return http.post("/v1/chat/completions", json=body)


@pytest.mark.parametrize("name", list(SPECS))
def test_served_logprobs_match_hf_hooks(http, model_name, hf, name):
    model, tok = hf
    r = served(http, model_name, SPECS[name])
    assert r.status_code == 200, r.text
    modes = sorted({item.get("mode", "add") for item in SPECS[name]})
    assert r.headers["x-steering-applied"].split("; ")[1] == "methods=" + ",".join(f"vectors.{m}" for m in modes)
    content = r.json()["choices"][0]["logprobs"]["content"]
    ids = tok.encode(tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)
    zero = reference.reference_bias(None, len(ids), LAYERS, HEADS)
    plain = served(http, model_name, None).json()["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] != [c["token"] for c in plain], "this steering does not move the model"
    generated: list[int] = []
    worst = 0.0
    for step, c in enumerate(content):
        with steered(model, SPECS[name], len(ids)):
            lp = reference.logprobs(model, ids, generated, zero)[-1]
        token = int(lp.argmax())
        assert tok.decode([token]) == c["token"], f"{name} step {step}: reference {tok.decode([token])!r}"
        worst = max(worst, abs(c["logprob"] - lp[token].item()))
        generated.append(token)
    assert worst < TOLERANCE, f"{name}: max |dlogprob| {worst:.2e}"
    print(f"SmolLM2 {name}: max |dlogprob| served vs HF hooks {worst:.2e}")


@pytest.mark.parametrize("item, field", [
    ({"data": {"3": [0.1] * 100}}, "steering.vectors[0].data"),
    ({"data": {"30": [0.1] * HIDDEN}}, "steering.vectors[0].data"),
    ({"data": {"3": [0.1] * HIDDEN}, "layers": [4]}, "steering.vectors[0].layers"),
    ({"data": {"3": [0.1] * HIDDEN}, "mode": "ablate", "scale": 3}, "steering.vectors.0"),
])
def test_bad_items_are_400s_naming_the_field(http, model_name, item, field):
    r = served(http, model_name, [item])
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]["message"], r.text
