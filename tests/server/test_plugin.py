"""The vLLM plugin acts only in engines steerserve starts, and is idempotent."""
from __future__ import annotations

import os
from importlib.metadata import entry_points

from steerserve.server import plugin


def test_entry_point_is_registered_with_vllm():
    eps = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert eps.get("steerserve") == "steerserve.server.plugin:register"


def test_plain_vllm_processes_are_untouched(monkeypatch):
    monkeypatch.delenv(plugin.ENGINE_FLAG, raising=False)
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    plugin.register()
    assert "VLLM_USE_V2_MODEL_RUNNER" not in os.environ


def test_steerserve_engines_get_the_v1_runner_idempotently(monkeypatch):
    monkeypatch.setenv(plugin.ENGINE_FLAG, "1")
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    plugin.register()
    plugin.register()
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"
