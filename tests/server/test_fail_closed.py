"""Fail closed: an engine whose worker hooks do not fire refuses to serve instead of serving unsteered."""
from __future__ import annotations

import asyncio
import os

import pytest
import torch
from vllm.v1.sample.logits_processor import LogitsProcessor

from steerserve.server.engine.async_engine import Engine
from steerserve.server.settings import Settings
from tests.tiny_models import build_tiny_llama


class HookThatNeverFires(LogitsProcessor):
    """Stands in for a runner where our processor is not installed: accepts plans, applies nothing."""

    def __init__(self, vllm_config, device, is_pin_memory):
        pass

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits


def test_engine_without_active_hooks_refuses_to_serve(tmp_path):
    model = build_tiny_llama(tmp_path / "tiny")
    settings = Settings.load(dtype="float32", max_model_len=128, kv_cache_gib=0.05, max_num_seqs=4)

    async def start() -> None:
        engine = Engine(settings, model, logits_processor=HookThatNeverFires)
        try:
            await engine.verify_steering()
        finally:
            engine.shutdown()

    with pytest.raises(RuntimeError, match="steering hooks are not active"):
        asyncio.run(start())


SITE_HOOK = """
import importlib.util
import sys


class PatchOnImport:
    # Runs `patch(module)` right after `{module}` is imported, wherever and whenever the process imports it.
    def find_spec(self, name, path, target=None):
        if name != "{module}":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            patch(module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, PatchOnImport())
"""


def injected(tmp_path, module: str, patch: str) -> dict[str, str]:
    """An environment whose Python processes (the engine's, which vLLM spawns, included) apply `patch` (source
    defining `patch(module)`) to `module` when they import it: a fault injected from outside the code under test,
    through a `sitecustomize` module. (Importing the module eagerly there would import torch before vLLM sets up
    its threads, which slows the engine down a hundredfold.)"""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(patch + SITE_HOOK.replace("{module}", module))
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH")) if p)}


UNREADABLE_CACHE = """
def patch(module):
    module.block_layout = lambda *args, **kwargs: (None, None)  # a KV cache layout nobody can read
"""


def serve_tiny(tmp_path, plans: list) -> tuple:
    """Start an Engine on a tiny model, run its start-up self-test, then serve one request per plan (None: plain),
    one after the other. Returns (attention_unsupported after start-up, facts at the end, each request's tokens,
    whether the engine died)."""
    from vllm.sampling_params import SamplingParams

    model = build_tiny_llama(tmp_path / "tiny")
    settings = Settings.load(dtype="float32", max_model_len=128, kv_cache_gib=0.05, max_num_seqs=4)

    async def serve():
        engine = Engine(settings, model)
        try:
            await engine.verify_steering()
            at_start, outs = engine.facts.attention_unsupported, []
            for plan in plans:
                params = SamplingParams(max_tokens=3, temperature=0, extra_args=plan.to_extra_args() if plan else None)
                finished = [out async for out in engine.generate([1, 2, 3], params, f"r{len(outs)}")][-1]
                outs.append(list(finished.outputs[0].token_ids))
            return at_start, engine.facts, outs, engine.llm.errored
        finally:
            engine.shutdown()

    return asyncio.run(serve())


def test_a_probe_that_cannot_run_switches_only_its_method_off(tmp_path, monkeypatch):
    """An attention probe that fails inside the engine step (here: a KV cache layout it cannot read) must not kill
    the engine: attention steering is switched off with the reason, and plain and logits-steered requests serve."""
    from steerserve.steering import spec as S
    from steerserve.steering.plan import LogitsPlan, Plan

    for name, value in injected(tmp_path, "steerserve.kernels.cpu_attention", UNREADABLE_CACHE).items():
        monkeypatch.setenv(name, value)
    _, facts, outs, errored = serve_tiny(tmp_path, [None, Plan("t", LogitsPlan(bias_ids=(7,), bias_values=(100.0,)))])
    assert not errored
    assert "cannot read this KV cache" in (facts.attention_unsupported or ""), facts.attention_unsupported
    assert outs[1] == [7, 7, 7] and outs[0] != outs[1]  # logits steering still applies; the plain row is plain
    with pytest.raises(S.SpecError, match="attention steering is not available on this model: .*cannot read"):
        S.compile_spec(S.merge([S.parse({"attention": {"sink": {"gamma": 0.5}}}, "steering")]), facts)


DYING_ENGINE = """
def patch(module):
    def apply(self, logits):  # the steering processor crashes the step at the first logits-steered row
        if self._active:
            raise RuntimeError("injected engine fault")
        return logits

    module.SteeringLogitsProcessor.apply = apply
"""


def test_an_engine_that_dies_during_start_up_ends_the_process(tmp_path):
    """A supervisor must see a dead engine: the server exits non-zero within seconds, with the reason on stderr,
    instead of answering /ready 503 forever."""
    import subprocess
    import sys
    import time

    model = build_tiny_llama(tmp_path / "tiny")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "steerserve.server", "serve", "--model", str(model), "--port", "0",
                           "--dtype", "float32", "--max-model-len", "128", "--kv-cache-gib", "0.05",
                           "--data-dir", str(tmp_path / "data")],
                          env={**os.environ, **injected(tmp_path, "steerserve.server.engine.processor", DYING_ENGINE)}, capture_output=True, text=True,
                          timeout=240)
    elapsed = time.monotonic() - started
    assert proc.returncode != 0
    assert "injected engine fault" in proc.stderr and "died" in proc.stderr, proc.stderr[-3000:]
    print(f"server exited {proc.returncode} after {elapsed:.1f} s (start-up included)")


FAULT_AFTER_START = """
def patch(module):
    original = module.biased_attention

    def biased_attention(q, k_t, v, q_pos, n_keys, bias, *args, **kwargs):
        if bias.min() > -1:  # not the start-up probe (gamma = e^-20): a request's own, milder steering
            raise RuntimeError("injected fault in a steered row")
        return original(q, k_t, v, q_pos, n_keys, bias, *args, **kwargs)

    module.biased_attention = biased_attention
"""


def test_a_hook_fault_while_serving_switches_its_method_off_for_later_requests(tmp_path, monkeypatch):
    """A steered row that fails inside the engine step (after a passing start-up probe) must not kill the engine:
    the method is switched off, later requests for it are refused with the reason, the rest serves."""
    from steerserve.steering import spec as S
    from steerserve.steering.plan import AttentionPlan, Plan

    for name, value in injected(tmp_path, "steerserve.kernels.cpu_attention", FAULT_AFTER_START).items():
        monkeypatch.setenv(name, value)
    mild = Plan("t", attention=AttentionPlan((-0.5,) * (2 * 4)))  # gamma ~ 0.6 on every head
    before, facts, _, errored = serve_tiny(tmp_path, [mild, None])
    assert before is None  # the start-up probe passed: attention steering was on
    assert not errored
    assert "injected fault in a steered row" in (facts.attention_unsupported or ""), facts.attention_unsupported
    with pytest.raises(S.SpecError, match="switched off after an engine fault"):
        S.compile_spec(S.merge([S.parse({"attention": {"sink": {"gamma": 0.5}}}, "steering")]), facts)


FAULT_ON_ADMISSION = """
def patch(module):
    original = module.row_steer

    def row_steer(plan, prompt_len, num_layers, num_heads):
        if min(plan.sink_log_gains or (0.0,)) > -1:  # not the start-up probe (gamma = e^-20)
            raise RuntimeError("injected fault admitting a steered row")
        return original(plan, prompt_len, num_layers, num_heads)

    module.row_steer = row_steer
"""


def test_a_fault_admitting_a_row_switches_its_method_off_and_the_engine_serves_on(tmp_path, monkeypatch):
    """The processor sets up each new row's hook state before the step: a failure there must not kill the engine
    either (it would take every tenant's requests with it)."""
    from steerserve.steering import spec as S
    from steerserve.steering.plan import AttentionPlan, LogitsPlan, Plan

    for name, value in injected(tmp_path, "steerserve.server.engine.attention_backend", FAULT_ON_ADMISSION).items():
        monkeypatch.setenv(name, value)
    mild = Plan("t", attention=AttentionPlan((-0.5,) * (2 * 4)))
    before, facts, outs, errored = serve_tiny(tmp_path, [mild, Plan("t", LogitsPlan(bias_ids=(7,), bias_values=(100.0,)))])
    assert before is None and not errored
    assert outs[1] == [7, 7, 7]  # the engine serves on, logits steering included
    assert "injected fault admitting a steered row" in (facts.attention_unsupported or ""), facts.attention_unsupported
    with pytest.raises(S.SpecError, match="switched off after an engine fault"):
        S.compile_spec(S.merge([S.parse({"attention": {"sink": {"gamma": 0.5}}}, "steering")]), facts)
