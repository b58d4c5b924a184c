"""The demo MoE (server/models/demo_moe.py, `steerserve models build smollm2-moe`) in a real vLLM engine: fTRI ranks the
expert that was built to carry the behaviour first, and switching it off removes the behaviour on held-out prompts
while switching off another expert of its layer does not (issue #6).

Needs the cached SmolLM2 (CI: `make model`); builds the demo MoE into the same cache on first use (about a minute).
fTRI here uses the training set's topic labels (space / other) over prompt tokens only, so no answer is generated
for it; benchmarks/ftri_demo.py runs the full version (classes from the answers) and reports the numbers.
"""
from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest

from steerserve.server.engine import plugin, router_hook
from steerserve.server.models import demo_moe
from steerserve.server.tools import ftri

DATA = Path(__file__).parents[2] / "benchmarks" / "data"


@pytest.fixture(scope="module")
def engine(tmp_path_factory, smollm2_path):
    path = demo_moe.build(base=smollm2_path)
    mp = pytest.MonkeyPatch()
    mp.setenv(router_hook.STATS_DIR, str(tmp_path_factory.mktemp("stats")))
    mp.setenv(plugin.ENGINE_FLAG, "1")
    try:
        llm = ftri.open_engine(path)
        yield path, llm
    finally:
        mp.undo()
        llm = None
        gc.collect()
        plugin.unregister()  # later engines in this process get plain vLLM


def test_ftri_ranks_the_behaviour_expert_first(engine, tmp_path):
    path, llm = engine
    report = ftri.run(path, [DATA / "moe_demo_ftri.jsonl"], "space", tmp_path, top_k=1, llm=llm)
    assert report["classes"] == {"other": 24, "space": 24}
    top = report["ranked"][0]
    assert top["expert"] == "{}.{}".format(*demo_moe.BEHAVIOUR), report["ranked"][:3]


def test_switching_the_behaviour_expert_off_removes_the_behaviour(engine):
    from steerserve.server.engine.builder import llm_facts

    path, llm = engine
    facts = llm_facts(llm, path)
    rows = [json.loads(line) for line in (DATA / "moe_demo_heldout.jsonl").read_text().splitlines()]
    prompts = [r["prompt"] for r in rows if r["label"] == "space"]  # 32 held-out space questions
    layer, expert = demo_moe.BEHAVIOUR
    other = (expert + 1) % demo_moe.NUM_EXPERTS
    rate = {name: sum(demo_moe.behaviour_hits(llm, facts, spec, prompts, max_tokens=16)[0]) / len(prompts)
            for name, spec in (("none", None), ("behaviour off", {"off": [f"{layer}.{expert}"]}),
                               ("other off", {"off": [f"{layer}.{other}"]}))}
    assert rate["none"] >= 0.4, rate
    assert rate["behaviour off"] <= rate["none"] / 2, rate
    assert rate["other off"] > rate["none"] / 2, rate
