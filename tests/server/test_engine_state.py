"""One `EngineState` per engine: a new engine in the same process starts with no rows and no method switched
off, for every registered engine hook, whatever the previous engine left behind (server/engine/state.py)."""
from __future__ import annotations

import gc
import os
from types import SimpleNamespace

import pytest
import torch

from steerserve.server.engine import state as engine_state
from steerserve.server.engine.hooks import HOOKS
from steerserve.steering.plan import AttentionPlan, ExpertsPlan, LogitsPlan, Plan
from tests.tiny_models import build_tiny_moe


def fresh(state: engine_state.EngineState) -> None:
    assert set(state.rows) == {h.family for h in HOOKS}  # every registered hook has its rows here
    for family, rows in state.rows.items():
        assert rows.rows == [] and rows.off is None, family
    assert state.step == {} and state.off() == {}


def test_a_processor_on_a_reused_config_gets_a_clean_state_and_the_old_one_goes():
    """A config object's id is what keys an engine's state: a new engine whose config reuses a dead one's id must
    not inherit its rows or `off` reasons (the drift that once left expert rows behind)."""
    from vllm.v1.sample.logits_processor import BatchUpdate

    from steerserve.server.engine.processor import SteeringLogitsProcessor

    hf = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4)
    config = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=4),
                             model_config=SimpleNamespace(get_vocab_size=lambda: 64, hf_text_config=hf))
    first = SteeringLogitsProcessor(config, torch.device("cpu"), False)
    fresh(first.state)
    plan = Plan("x", LogitsPlan(bias_ids=(3,), bias_values=(1.0,)), AttentionPlan((0.5,) * 8),
                ExpertsPlan(off=((0, 1),)))
    first.update_state(BatchUpdate(1, [], [(0, SimpleNamespace(extra_args=plan.to_extra_args()), [1, 2], [])], []))
    assert [r for r, _ in first.state.rows["attention"].rows] == [0]
    assert [r for r, _ in first.state.rows["experts"].rows] == [0]
    for rows in first.state.rows.values():
        rows.off = "left behind"
    old = first.state

    second = SteeringLogitsProcessor(config, torch.device("cpu"), False)
    assert second.state is not old and engine_state.of(config) is second.state
    fresh(second.state)
    del first, old
    gc.collect()
    assert engine_state.of(config) is second.state  # the old processor's teardown leaves the new state alone
    del second
    gc.collect()
    assert engine_state.of(config) is None  # torn down with its processor


PROMPT = [5, 17, 33, 2, 41, 9, 12, 7]
SPECS = {"plain": None, "sink": Plan("sink", AttentionPlan((-4.0,) * (2 * 4))),
         "experts": Plan("experts", ExpertsPlan(off=((0, 0), (0, 1), (0, 2), (1, 3), (1, 4))))}


def run_engine(path) -> tuple[dict[str, tuple[list[int], list[float]]], engine_state.EngineState]:
    """Greedy outputs of every spec on a new engine, and that engine's state (checked fresh before any request)."""
    import vllm

    from steerserve.server.engine.processor import SteeringLogitsProcessor

    before = set(map(id, engine_state._STATES.values()))
    llm = vllm.LLM(model=str(path), dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=4,
                   kv_cache_memory_bytes=64 * 2**20, logits_processors=[SteeringLogitsProcessor],
                   logprobs_mode="processed_logprobs", seed=0)
    (state,) = [s for s in engine_state._STATES.values() if id(s) not in before]
    fresh(state)
    try:
        outs = llm.generate([{"prompt_token_ids": PROMPT, "cache_salt": name} for name in SPECS],
                            [vllm.SamplingParams(temperature=0, max_tokens=4, logprobs=0, ignore_eos=True,
                                                 extra_args=plan.to_extra_args() if plan else None)
                             for plan in SPECS.values()], use_tqdm=False)
    finally:
        del llm
        gc.collect()
    return {name: (list(o.outputs[0].token_ids), [lp[t].logprob for t, lp in zip(
        o.outputs[0].token_ids, o.outputs[0].logprobs, strict=True)]) for name, o in zip(SPECS, outs, strict=True)
            }, state


@pytest.mark.skipif(os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0", reason="needs the in-process engine")
def test_a_second_engine_in_the_process_starts_clean_and_steers_like_the_first(tmp_path):
    from steerserve.server.engine import plugin

    path = build_tiny_moe(tmp_path / "mixtral", "mixtral")
    os.environ[plugin.ENGINE_FLAG] = "1"
    try:
        plugin.register()
        first, state = run_engine(path)
        assert first["sink"] != first["plain"] and first["experts"] != first["plain"]  # both hooks fired
        for rows in state.rows.values():  # whatever the first engine leaves, the second must not see it
            rows.off = "left behind by the first engine"
        second, _ = run_engine(path)
    finally:
        del os.environ[plugin.ENGINE_FLAG]
        plugin.unregister()  # later engines in this process get plain vLLM
    assert second == first  # the same steering as a first engine: exactly (fp32, greedy, one batch)
