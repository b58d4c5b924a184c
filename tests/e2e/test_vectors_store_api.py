"""Named control vectors on the session server (SmolLM2, fp32): a vector registered in the store and named in a
request steers exactly as the same vector inline, and as HF transformers eager with the addition written out
below as forward hooks; unknown or another tenant's names are 404s naming the field; profiles hold names and
follow the store when a vector is replaced."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from steerserve.steering.control_vectors import ControlVector
from steerserve.steering.vector_files import to_bytes
from tests.conftest import auth

MESSAGES = [{"role": "user", "content": "Write one sentence about the weather today."}]
LAYERS = (6, 10, 14)
SCALE = 8.0
TOLERANCE = 2e-3  # 30 fp32 layers, as for the other methods over HTTP
GGUF = {"Content-Type": "application/octet-stream"}


def unit_vector(seed: int) -> ControlVector:
    rng = np.random.default_rng(seed)
    dirs = {layer: rng.standard_normal(576) for layer in LAYERS}
    return ControlVector.of({layer: d / np.linalg.norm(d) for layer, d in dirs.items()}, "llama")


def inline(vector: ControlVector) -> dict:
    return {str(layer): vector.directions[layer].tolist() for layer in vector.layers}


def chat(http, model_name, steering=None, headers=None, max_tokens=8):
    body = {"model": model_name, "messages": MESSAGES, "temperature": 0, "max_tokens": max_tokens, "logprobs": True}
    if steering is not None:
        body["steering"] = steering
    return http.post("/v1/chat/completions", json=body, headers=headers or {})


def answer(r) -> list[tuple[str, float]]:
    assert r.status_code == 200, r.text
    return [(c["token"], c["logprob"]) for c in r.json()["choices"][0]["logprobs"]["content"]]


@pytest.fixture(scope="module")
def hf(smollm2_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    return model, AutoTokenizer.from_pretrained(smollm2_path)


def hf_greedy(model, tok, vector: ControlVector, scale: float, steps: int) -> list[tuple[str, float]]:
    """Greedy decoding with `scale * v_l` added to the output of decoder layer l at every position."""
    def adder(layer):
        add = torch.tensor(scale * vector.directions[layer])

        def hook(_module, _args, output):
            if isinstance(output, tuple):
                return (output[0] + add, *output[1:])
            return output + add
        return hook

    handles = [model.model.layers[layer].register_forward_hook(adder(layer)) for layer in vector.layers]
    try:
        text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]  # as the server renders a chat
        out = []
        with torch.inference_mode():
            for _ in range(steps):
                logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
                token = int(logprobs.argmax())
                out.append((tok.decode([token]), float(logprobs[token])))
                ids.append(token)
        return out
    finally:
        for handle in handles:
            handle.remove()


def test_a_named_vector_steers_as_inline_data_and_as_hf_hooks(http, model_name, hf):
    vector = unit_vector(1)
    r = http.put("/v1/steering/vectors/e2e-named", content=to_bytes(vector, "gguf"), headers=GGUF)
    assert r.status_code == 200 and r.json()["layers"] == list(LAYERS), r.text
    named = chat(http, model_name, {"vectors": [{"name": "e2e-named", "scale": SCALE}]})
    assert "vectors.add" in named.headers["x-steering-applied"]
    got = answer(named)
    assert got == answer(chat(http, model_name, {"vectors": [{"data": inline(vector), "scale": SCALE}]}))
    plain = answer(chat(http, model_name))
    assert got != plain, "the vector does not move the model; the test would be weak"
    model, tok = hf
    reference = hf_greedy(model, tok, vector, SCALE, len(got))
    assert [t for t, _ in got] == [t for t, _ in reference]
    worst = max(abs(a - b) for (_, a), (_, b) in zip(got, reference, strict=True))
    assert worst < TOLERANCE, f"max |dlogprob| {worst:.2e}"


def test_unknown_and_foreign_names_are_404_naming_the_field(http, server, model_name, api_keys):
    r = http.put("/v1/steering/vectors/e2e-mine", content=to_bytes(unit_vector(2), "gguf"), headers=GGUF)
    assert r.status_code == 200, r.text
    for steering, headers, param in (
            ({"vectors": [{"data": inline(unit_vector(3))}, {"name": "e2e-nothing"}]}, None, "steering.vectors[1].name"),
            (None, {"X-Steering": '{"vectors": [{"name": "e2e-nothing"}]}'}, "X-Steering.vectors[0].name"),
            ({"vectors": [{"name": "e2e-mine"}]}, auth(api_keys["bob"]), "steering.vectors[0].name")):
        r = chat(http, model_name, steering, headers)
        assert r.status_code == 404, r.text
        assert r.json()["error"]["param"] == param and r.json()["error"]["code"] == "vector_not_found"
    assert answer(chat(http, model_name, {"vectors": [{"name": "e2e-mine"}]}))  # alice's own still works


def test_profiles_hold_names_and_follow_the_store(http, model_name):
    profile = {"vectors": [{"name": "e2e-prof", "scale": SCALE, "tokens": "generated"}]}
    r = http.put("/v1/steering/profiles/e2e-prof", json=profile)
    assert r.status_code == 404 and r.json()["error"]["param"] == "profile.vectors[0].name", r.text
    first, second = unit_vector(4), unit_vector(5)
    for vector in (first, second):
        r = http.put("/v1/steering/vectors/e2e-prof", content=to_bytes(vector, "safetensors"), headers=GGUF)
        assert r.status_code == 200, r.text
        assert http.put("/v1/steering/profiles/e2e-prof", json=profile).status_code == 200
        via_profile = answer(chat(http, model_name, headers={"X-Steering-Profile": "e2e-prof"}, max_tokens=12))
        expected = {"vectors": [{"data": inline(vector), "scale": SCALE, "tokens": "generated"}]}
        assert via_profile == answer(chat(http, model_name, expected, max_tokens=12))
        if vector is first:
            before = via_profile
    assert before != via_profile, "two different vectors gave one answer; the test cannot tell them apart"


def test_cli_store_commands(server, api_keys, tmp_path, capsys):
    import json

    from steerserve.server.cli import main as steerserve
    from steerserve.steering.vector_files import read_vector_file, write_vector_file

    vector = unit_vector(6)
    write_vector_file(vector, tmp_path / "cli.safetensors")
    common = ["--url", server.url, "--api-key", api_keys["bob"]]
    assert steerserve(["vectors", "put", "e2e-cli", str(tmp_path / "cli.safetensors"), *common]) == 0
    assert json.loads(capsys.readouterr().out)["digest"] == vector.digest()
    assert steerserve(["vectors", "list", *common]) == 0
    assert "e2e-cli" in [v["name"] for v in json.loads(capsys.readouterr().out)["data"]]
    out = tmp_path / "back.gguf"
    assert steerserve(["vectors", "get", "e2e-cli", "--format", "gguf", "--out", str(out), *common]) == 0
    assert read_vector_file(out).digest() == vector.digest()
    assert steerserve(["vectors", "delete", "e2e-cli", *common]) == 0
    capsys.readouterr()
    assert steerserve(["vectors", "get", "e2e-cli", *common]) == 1
    assert "HTTP 404: steering vector 'e2e-cli' not found" in capsys.readouterr().err
    assert steerserve(["vectors", "put", "e2e-cli", str(tmp_path / "cli.safetensors"), "--scope", "global",
                       *common]) == 1
    assert "HTTP 403" in capsys.readouterr().err
