"""The vLLM plugin acts only in engines steerserve starts, and is idempotent."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from steerserve.server.engine import attention_backend, plugin, vllm_compat
from tests.server import plugin_probe
from tests.tiny_models import build_tiny_llama

ROOT = Path(__file__).resolve().parents[2]


def test_entry_point_is_registered_with_vllm():
    eps = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert eps.get("steerserve") == "steerserve.server.engine.plugin:register"


def probe(model_dir: Path, **env: str) -> dict:
    """tests/server/plugin_probe.py in a fresh process: vLLM builds an engine and loads its plugins itself."""
    clean = {k: v for k, v in os.environ.items()
             if k not in (plugin.ENGINE_FLAG, "VLLM_USE_V2_MODEL_RUNNER", "VLLM_PLUGINS")}
    proc = subprocess.run([sys.executable, "-m", "tests.server.plugin_probe", str(model_dir)], cwd=ROOT,
                          env={**clean, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1", **env},
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(plugin_probe.MARK)]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1].removeprefix(plugin_probe.MARK))


@pytest.fixture(scope="module")
def probes(tmp_path_factory) -> dict[str, dict]:
    model_dir = build_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", seed=0)
    runs = {"without plugin": {"VLLM_PLUGINS": "none"},  # vLLM loads only plugins of that name: not ours
            "plain": {}, "steerserve": {plugin.ENGINE_FLAG: "1"}}
    with ThreadPoolExecutor(len(runs)) as pool:
        futures = {name: pool.submit(probe, model_dir, **env) for name, env in runs.items()}
    return {name: f.result() for name, f in futures.items()}


HOOKS_OFF = {"attention_override": None, "router_is_vllms": True, "router_marked": False, "forward_is_vllms": True,
             "forward_marked": False, "step_hooks": 0, "lora_fix": False, "v2_runner_env": None}


def test_plain_vllm_processes_are_untouched(probes):
    """An engine built without STEERSERVE_ENGINE=1 loads our plugin and gets none of our hooks: vLLM's own
    attention backend, router and model forward, no LoRA op patch, no runner switch; and it generates exactly
    (tokens and logprobs) what the same engine generates with our plugin not loaded at all."""
    plain, alone = probes["plain"], probes["without plugin"]
    assert plain["plugin_calls"] == 1 and alone["plugin_calls"] == 0
    assert {k: plain[k] for k in HOOKS_OFF} == HOOKS_OFF
    assert plain["attention_impls"] and all(name.startswith("vllm.") for name in plain["attention_impls"])
    assert plain["attention_impls"] == alone["attention_impls"]
    assert plain["generated"] == alone["generated"] and len(plain["generated"][0]) == 8


def test_the_probe_sees_every_hook_of_a_steerserve_engine(probes):
    """The control: with STEERSERVE_ENGINE=1 each hook the test above looks for is there, so its absence there
    means something."""
    ours = probes["steerserve"]
    assert ours["plugin_calls"] == 1 and ours["attention_override"] == attention_backend.BACKEND_PATH
    assert ours["attention_impls"] == [f"{attention_backend.SteeringCPUImpl.__module__}.SteeringCPUImpl"]
    assert {k: ours[k] for k in HOOKS_OFF} == {**HOOKS_OFF, "attention_override": attention_backend.BACKEND_PATH,
                                                "router_is_vllms": False, "router_marked": True,
                                                "forward_is_vllms": False, "forward_marked": True, "step_hooks": 1,  # the EngineState step hook, shared by every method
                                                "lora_fix": True, "v2_runner_env": "0"}


def test_steerserve_engines_get_the_v1_runner_idempotently(monkeypatch):
    monkeypatch.setenv(plugin.ENGINE_FLAG, "1")
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    plugin.register()
    plugin.register()
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"


def test_the_version_check_knows_the_tested_vllm():
    assert vllm_compat.is_tested_vllm("0.32.0") and vllm_compat.is_tested_vllm("0.32.0+cpu")
    assert not vllm_compat.is_tested_vllm("0.33.0") and not vllm_compat.is_tested_vllm("0.32")
    assert vllm_compat.check_vllm_version("0.32.0", env={}) is True
    with pytest.raises(vllm_compat.UntestedVllmError) as info:
        vllm_compat.check_vllm_version("0.99.1", env={})
    assert "0.99.1" in str(info.value) and vllm_compat.ALLOW_UNTESTED_ENV in str(info.value)
    assert vllm_compat.check_vllm_version("0.99.1", env={vllm_compat.ALLOW_UNTESTED_ENV: "1"}) is False
    assert vllm_compat.is_tested_vllm(vllm_compat.installed_vllm_version())  # this environment is a tested one


def test_the_plugin_refuses_an_untested_vllm_unless_overridden(monkeypatch):
    """On an unknown vLLM a steerserve engine gets a start-up error and nothing is patched; with the override it
    gets its hooks (and a warning). Plain vLLM engines are never refused."""
    monkeypatch.setattr(vllm_compat, "installed_vllm_version", lambda: "0.99.1")
    monkeypatch.delenv(vllm_compat.ALLOW_UNTESTED_ENV, raising=False)
    monkeypatch.delenv(plugin.ENGINE_FLAG, raising=False)
    plugin.register()  # not a steerserve engine: no check, no patch
    monkeypatch.setenv(plugin.ENGINE_FLAG, "1")
    plugin.unregister()  # from a clean process state, whatever ran before
    router = vllm_compat.router_class()
    before = router.__dict__[vllm_compat.SELECT_EXPERTS]
    with pytest.raises(vllm_compat.UntestedVllmError, match="0.99.1"):
        plugin.register()
    assert router.__dict__[vllm_compat.SELECT_EXPERTS] is before and vllm_compat.cpu_attention_override() is None
    monkeypatch.setenv(vllm_compat.ALLOW_UNTESTED_ENV, "1")
    try:
        plugin.register()
        assert vllm_compat.cpu_attention_override() == attention_backend.BACKEND_PATH
    finally:
        plugin.unregister()
