"""The vLLM plugin (`vllm.general_plugins` entry point): runs in every vLLM process before the engine is built.

It acts only in engines that steerserve starts (`STEERSERVE_ENGINE=1`, set by `Engine`), so a plain vLLM server
in the same environment, such as the benchmarks' baseline, stays untouched. It must be idempotent: vLLM calls it
once per process, and tests may call it again.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger("steerserve.plugin")

ENGINE_FLAG = "STEERSERVE_ENGINE"


def register() -> None:
    if os.environ.get(ENGINE_FLAG) != "1":
        return
    # Our worker hooks are V1-runner logits processors. GPU vLLM defaults to Model Runner V2, which rejects them
    # (a different logits-processor API); CPU always runs V1. Forcing it here covers every process, spawned ones included.
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER") != "0":
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        log.info("steerserve: forcing the V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0) for the steering hooks")
    # LoRA on vLLM-CPU: base rows must not pick up the adapter in the last slot (docs/adapters.md), and one
    # matmul per adapter instead of a weight gather per row (lora_fix.py).
    from . import lora_fix

    if lora_fix.apply():
        log.debug("steerserve: fixed, grouped torch LoRA ops installed")

    from . import engine_state
    from .method_hooks import HOOKS

    for hook in HOOKS:  # every engine hook's vLLM patches, then the step hook they share
        hook.register()
    engine_state.register()


def unregister() -> None:
    """Undo the steering hooks of `register` (tests: later engines in the process get plain vLLM; the LoRA fix
    stays, it only fixes vLLM)."""
    from . import engine_state
    from .method_hooks import HOOKS

    engine_state.unregister()
    for hook in reversed(HOOKS):
        hook.unregister()
