"""The engine ZeroTuning calibration (steering/calibrate.py) scores on, built here and handed to its `Scorer`.

The steering layer never builds engines itself: whoever calls it (the `steerserve calibrate sink` command, the
benchmarks, the tests) opens one with `open_engine` and passes it in.
"""
from __future__ import annotations

from pathlib import Path

from steerserve.steering.model import ModelFacts


def open_engine(model_path: str, dtype: str = "float32", max_model_len: int = 1024, seed: int = 0):
    """An in-process vLLM engine with steerserve's plugin and steering processor (server/engine/builder.py), and
    the served model's facts. Callers must run under `if __name__ == "__main__":` (vLLM spawns)."""
    from steerserve.server.engine.builder import open_steering_llm

    llm = open_steering_llm(model_path, dtype=dtype, enforce_eager=True, max_model_len=max_model_len,
                            max_num_seqs=256, max_num_batched_tokens=8192, enable_prefix_caching=False,
                            kv_cache_memory_bytes=512 * 2**20, logprobs_mode="processed_logprobs", seed=seed)
    return llm, model_facts(llm, model_path)


def model_facts(llm, model_path: str | Path) -> ModelFacts:
    """The facts steering needs about the model `llm` has loaded."""
    from steerserve.server.engine.builder import llm_facts

    return llm_facts(llm, model_path)
