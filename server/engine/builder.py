"""The one builder of offline steering engines: a `vllm.LLM` with steerserve's plugin hooks and steering processor.

The server's own engine is `async_engine.Engine` (an AsyncLLM); everything else that steers in-process, calibration
(server/tools/calibration_engine.py), fTRI (server/tools/ftri.py), the benchmarks and the tests, builds its engine here, with
its own engine arguments passed through unchanged. Only `logits_processors` gets a default, the steering
processor; nothing else is added (a caller that wants the steered distribution's logprobs passes
`logprobs_mode="processed_logprobs"` itself). Callers must run under `if __name__ == "__main__":` when vLLM spawns.
"""
from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from steerserve.steering.model import ModelFacts

from . import plugin, tp, vllm_compat
from .async_engine import model_facts
from .processor import SteeringLogitsProcessor


def open_steering_llm(model: str | Path, **engine_kwargs):
    """A `vllm.LLM` on `model` with the steering hooks, kept for the life of the process: the plugin stays enabled
    (`plugin.enable`), as in the server. `engine_kwargs` go to `vllm.LLM` as given."""
    import vllm

    plugin.enable()
    if engine_kwargs.get("tensor_parallel_size", 1) > 1:  # each rank its own cores (server/engine/tp.py)
        tp.bind_cpus(engine_kwargs["tensor_parallel_size"])
    engine_kwargs.setdefault("logits_processors", [SteeringLogitsProcessor])
    return vllm.LLM(model=str(model), **engine_kwargs)


@contextmanager
def steering_llm(model: str | Path, **engine_kwargs) -> Iterator:
    """`open_steering_llm` for a while: the plugin's env flag is set only while the engine is built (engines built
    later in the process do not inherit it), and on exit the engine is dropped and collected and the hooks are
    unregistered (`plugin.unregister`), so later engines in this process get plain vLLM. Callers should drop their
    own references before the block ends."""
    previous = os.environ.get(plugin.ENGINE_FLAG)
    try:
        llm = open_steering_llm(model, **engine_kwargs)
    except BaseException:
        plugin.unregister()
        raise
    finally:
        if previous is None:
            os.environ.pop(plugin.ENGINE_FLAG, None)
        else:
            os.environ[plugin.ENGINE_FLAG] = previous
    try:
        yield llm
    finally:
        del llm
        gc.collect()
        plugin.unregister()


def llm_facts(llm, model_path: str | Path) -> ModelFacts:
    """The facts steering needs about the model an offline engine has loaded."""
    return model_facts(llm.get_tokenizer(), vllm_compat.llm_model_config(llm), Path(model_path))
