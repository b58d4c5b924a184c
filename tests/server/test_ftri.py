"""fTRI on a tiny random Mixtral: the engine-recorded routing frequencies, scores and ranking equal those computed
independently from HF transformers' routing (tests/experts_reference.py, no masks), and the outputs are written."""
from __future__ import annotations

import gc
import json

import torch

from steerserve.server.engine import plugin, router_hook
from steerserve.server.tools import ftri
from tests import experts_reference as reference
from tests.tiny_models import build_tiny_moe

SETS = {
    "licence": ["You may convey a work based on the Program", "THERE IS NO WARRANTY FOR THE PROGRAM",
                "the terms of section 4 of this License"],
    "other": ["Preamble", "How do bees make honey and why", "A short poem about the sea at night"],
}


def test_ftri_ranks_experts_as_the_hf_routing_does(tmp_path, monkeypatch):
    path = build_tiny_moe(tmp_path / "mixtral", "mixtral")
    for name, prompts in SETS.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    monkeypatch.setenv(router_hook.STATS_DIR, str(tmp_path / "stats"))
    (tmp_path / "stats").mkdir()
    monkeypatch.setenv(plugin.ENGINE_FLAG, "1")
    try:
        report = ftri.run(path, [tmp_path / "licence.jsonl", tmp_path / "other.jsonl"], "licence", tmp_path / "out",
                          top_k=3, chat=False)
    finally:
        gc.collect()
        plugin.unregister()  # later engines in this process get plain vLLM
    assert report["classes"] == {"licence": 3, "other": 3}

    # independently: HF routing, counted token by token over each prompt
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = reference.load(path, "mixtral")
    chosen: dict[int, list[list[int]]] = {}
    for idx, layer in enumerate(model.model.layers):
        gate, forward = layer.mlp.gate, layer.mlp.gate.forward

        def record(h, forward=forward, idx=idx):
            logits, weights, ids = forward(h)
            chosen.setdefault(idx, []).append(ids)
            return logits, weights, ids

        gate.forward = record
    mean = {}
    for name, prompts in SETS.items():
        freqs = []
        for p in prompts:
            chosen.clear()
            reference.logprobs(model, tok(p).input_ids, [], None)
            n = len(tok(p).input_ids)
            freqs.append(torch.stack([torch.bincount(chosen[la][0].flatten(), minlength=8).double() / n
                                      for la in (0, 1)]))
        mean[name] = torch.stack(freqs).mean(0)
    score = mean["licence"] - mean["other"]
    ranked = report["ranked"]
    assert len(ranked) == 16
    for r in ranked:
        layer, expert = map(int, r["expert"].split("."))
        assert abs(r["score"] - score[layer, expert].item()) < 1e-9, r
    assert [r["score"] for r in ranked] == sorted((r["score"] for r in ranked), reverse=True)
    profile = json.loads((tmp_path / "out" / "profile.json").read_text())
    assert profile == {"experts": {"off": [r["expert"] for r in ranked[:3]]}}
    assert (tmp_path / "out" / "ftri.png").stat().st_size > 1000
