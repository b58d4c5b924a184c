"""The control vector trainer on a tiny random Llama: last-token states against HF's own `output_hidden_states`
(hidden_states[l + 1] is the output of decoder layer l, below the last layer), the two methods against their
definitions written out with numpy, the sign convention, determinism, pairs files, and the CLI end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from steerserve.server.cli import main as steerserve
from steerserve.server.training.vectors import (
    DataError,
    Pair,
    last_token_states,
    parse_layers,
    read_pairs,
    template_pairs,
    train_vector,
)
from steerserve.steering.vector_files import read_vector_file
from tests.tiny_models import build_tiny_llama

TEXTS = [("the cat sat on the mat", "a dog ran"), ("hello world", "goodbye moon and stars"),
         ("one two three four", "five"), ("red green", "blue yellow purple orange")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), num_hidden_layers=4)
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), \
        AutoTokenizer.from_pretrained(path)


def reference_states(model, tok, texts, layers):
    """Each text alone, no padding: HF's hidden_states[l + 1] at the last token."""
    out = {layer: [] for layer in layers}
    with torch.inference_mode():
        for text in texts:
            hs = model(**tok(text, return_tensors="pt"), output_hidden_states=True).hidden_states
            for layer in layers:
                out[layer].append(hs[layer + 1][0, -1].numpy())
    return {layer: np.stack(v) for layer, v in out.items()}


def test_states_are_the_layer_outputs_at_each_texts_last_token(tiny):
    _, model, tok = tiny
    texts = [t for pair in TEXTS for t in pair]
    got = last_token_states(model, tok, texts, [0, 1, 2], batch_size=3)  # batches mix lengths: padding matters
    want = reference_states(model, tok, texts, [0, 1, 2])
    for layer in (0, 1, 2):
        np.testing.assert_allclose(got[layer], want[layer], atol=1e-4, rtol=1e-5)  # fp32, batched vs alone


def test_methods_match_their_definitions_and_point_to_positive(tiny):
    path, model, tok = tiny
    pairs = [Pair(p, n) for p, n in TEXTS]
    layers = [1, 2]
    states = reference_states(model, tok, [t for pair in TEXTS for t in pair], layers)
    mean = train_vector(path, pairs, "mean", layers, batch_size=2)
    pcas = {m: train_vector(path, pairs, m, layers, batch_size=2) for m in ("pca", "pca-centred")}
    for layer in layers:
        pos, neg = states[layer][0::2].astype(np.float64), states[layer][1::2].astype(np.float64)
        diffs = pos - neg
        np.testing.assert_allclose(mean.vector.directions[layer], diffs.mean(0), atol=5e-5, rtol=1e-4)
        # pca: the top eigenvector of the differences' scatter matrix; pca-centred: of their covariance.
        for method, d in (("pca", diffs), ("pca-centred", diffs - diffs.mean(0))):
            top = np.linalg.eigh(d.T @ d)[1][:, -1]
            u = pcas[method].vector.directions[layer].astype(np.float64)
            assert abs(np.linalg.norm(u) - 1) < 1e-5
            assert abs(abs(u @ top) - 1) < 1e-4, method
            above = np.mean(pos @ u > neg @ u)
            assert above >= np.mean(pos @ u < neg @ u)  # the sign: most pairs' positive text projects higher
            assert pcas[method].report["per_layer"][str(layer)]["separation"] == pytest.approx(above)
    assert mean.report["method"] == "mean" and mean.report["layers"] == layers and mean.report["pairs"] == 4


def test_the_sign_follows_the_labels(tiny):
    path, _, _ = tiny
    pairs = [Pair(p, n) for p, n in TEXTS]
    swapped = [Pair(n, p) for p, n in TEXTS]
    for method in ("mean", "pca", "pca-centred"):
        a = train_vector(path, pairs, method, [2]).vector.directions[2]
        b = train_vector(path, swapped, method, [2]).vector.directions[2]
        np.testing.assert_allclose(a, -b, atol=1e-5)


def test_pairs_files_and_layers(tmp_path):
    lines = tmp_path / "pairs.jsonl"
    lines.write_text('{"positive": "a", "negative": "b"}\n\n{"positive": "c", "negative": "d"}\n')
    assert read_pairs(lines) == [Pair("a", "b"), Pair("c", "d")]
    template = tmp_path / "template.json"
    template.write_text(json.dumps({"template": "You are {persona}.", "positive": ["happy", "glad"],
                                    "negative": ["sad", "blue"], "suffixes": [" Hi", " Bye"]}))
    assert read_pairs(template) == [Pair("You are happy. Hi", "You are sad. Hi"), Pair("You are glad. Hi",
                                    "You are blue. Hi"), Pair("You are happy. Bye", "You are sad. Bye"),
                                    Pair("You are glad. Bye", "You are blue. Bye")]
    for bad, message in (('{"positive": "a"}\n{"positive": "a", "negative": "b"}\n', ":1:"),
                         ('{"positive": "a", "negative": "b"}\n', "at least 2 pairs"),
                         ("not json\n{}\n", "not valid JSON")):
        lines.write_text(bad)
        with pytest.raises(DataError, match=message):
            read_pairs(lines)
    with pytest.raises(DataError, match="as many personas"):
        template_pairs({"template": "{persona}", "positive": ["a"], "negative": ["b", "c"]})
    assert parse_layers(None, 4, allow_zero=False) == [1, 2, 3]
    assert parse_layers("all", 4, allow_zero=True) == [0, 1, 2, 3]
    assert parse_layers("1,2-3", 4, allow_zero=False) == [1, 2, 3]
    with pytest.raises(DataError, match="layer 0 cannot be written to GGUF"):
        parse_layers("0-2", 4, allow_zero=False)
    with pytest.raises(DataError, match="outside"):
        parse_layers("9", 4, allow_zero=True)


def test_cli_writes_gguf_and_report_deterministically(tiny, tmp_path, capsys):
    path, _, _ = tiny
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"positive": p, "negative": n}) + "\n" for p, n in TEXTS))
    outs = []
    for run in ("a", "b"):
        out = tmp_path / run / "calm.gguf"
        assert steerserve(["vectors", "train", "--model", str(path), "--pairs", str(pairs), "--method", "pca",
                           "--layers", "1-3", "--out", str(out), "--seed", "7", "--quiet"]) == 0
        outs.append(out)
    assert outs[0].read_bytes() == outs[1].read_bytes()
    vector = read_vector_file(outs[0])
    report = json.loads(outs[0].with_suffix(".json").read_text())
    assert vector.layers == (1, 2, 3) and report["digest"] == vector.digest() and report["seed"] == 7
    assert "calm.gguf: pca vector on 3 layers from 4 pairs" in capsys.readouterr().out
    assert steerserve(["vectors", "train", "--model", str(path), "--pairs", str(pairs), "--layers", "0",
                       "--out", str(tmp_path / "zero.gguf"), "--quiet"]) == 1
    assert "layer 0 cannot be written to GGUF" in capsys.readouterr().err
    assert steerserve(["vectors", "train", "--model", str(path), "--pairs", str(pairs), "--layers", "0",
                       "--out", str(tmp_path / "zero.safetensors"), "--quiet"]) == 0
    assert read_vector_file(tmp_path / "zero.safetensors").layers == (0,)


def test_register_uploads_the_file_and_reports_failure(tiny, tmp_path, capsys, monkeypatch):
    """`--register URL` PUTs the written file as the raw body, with the API key, under --name and --scope."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen, answers = [], [(200, {"name": "joy", "scope": "global"}), (400, {"error": {"message": "bad vector"}})]

    class Store(BaseHTTPRequestHandler):
        def do_PUT(self):  # noqa: N802 (the stdlib's name)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append((self.path, self.headers["Authorization"], self.headers["Content-Type"], body))
            status, answer = answers[len(seen) - 1]
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(json.dumps(answer).encode())

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Store)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    path, _, _ = tiny
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"positive": p, "negative": n}) + "\n" for p, n in TEXTS))
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    monkeypatch.setenv("STEERSERVE_API_KEY", "sk-test")
    try:
        args = ["vectors", "train", "--model", str(path), "--pairs", str(pairs), "--layers", "2", "--quiet",
                "--register", url + "/v1", "--name", "joy", "--scope", "global"]
        assert steerserve([*args, "--out", str(tmp_path / "a.gguf")]) == 0
        assert seen[0][:3] == ("/v1/steering/vectors/joy?scope=global", "Bearer sk-test", "application/octet-stream")
        assert seen[0][3] == (tmp_path / "a.gguf").read_bytes()
        report = json.loads((tmp_path / "a.json").read_text())
        assert report["registered"]["name"] == "joy" and "registered as 'joy'" in capsys.readouterr().out
        assert steerserve([*args, "--out", str(tmp_path / "b.gguf")]) == 1
        assert "registering it failed: HTTP 400: bad vector" in capsys.readouterr().err
        assert (tmp_path / "b.gguf").exists() and (tmp_path / "b.json").exists()
    finally:
        httpd.shutdown()
