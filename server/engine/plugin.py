"""The vLLM plugin (`vllm.general_plugins` entry point): runs in every vLLM process before the engine is built.

It acts only in engines that steerserve starts (`STEERSERVE_ENGINE=1`, set by `Engine` and `builder`), so a plain
vLLM server in the same environment, such as the benchmarks' baseline, stays untouched. It must be idempotent: vLLM
calls it once per process, and tests may call it again. Before it patches anything it checks the vLLM version
(`vllm_compat.check_vllm_version`): an untested vLLM gets `UntestedVllmError` and no patch, unless
`STEERSERVE_ALLOW_UNTESTED_VLLM=1`.
"""
from __future__ import annotations

import logging
import os

from . import vllm_compat

log = logging.getLogger("steerserve.plugin")

ENGINE_FLAG = "STEERSERVE_ENGINE"


def register() -> None:
    """Install the steering hooks in this process, if it runs a steerserve engine; idempotent. Raises
    `vllm_compat.UntestedVllmError`, with nothing patched, on an untested vLLM without the override."""
    if os.environ.get(ENGINE_FLAG) != "1":
        return
    vllm_compat.check_vllm_version()
    # Our worker hooks are V1-runner logits processors. GPU vLLM defaults to Model Runner V2, which rejects them
    # (a different logits-processor API); CPU always runs V1. Forcing it here covers every process, spawned ones included.
    if os.environ.get(vllm_compat.V2_RUNNER_ENV) != "0":
        os.environ[vllm_compat.V2_RUNNER_ENV] = "0"
        log.info("steerserve: forcing the V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0) for the steering hooks")
    # LoRA on vLLM-CPU: base rows must not pick up the adapter in the last slot (docs/adapters.md), and one
    # batched matmul over all adapters instead of a weight gather per row (lora_ops_patch.py).
    from . import lora_ops_patch

    if lora_ops_patch.apply():
        log.debug("steerserve: fixed, grouped torch LoRA ops installed")

    from . import state
    from .hooks import HOOKS

    for hook in HOOKS:  # every engine hook's vLLM patches, then the step hook they share
        hook.register()
    state.register()


def enable() -> None:
    """Turn the plugin on for this process and the engine processes it spawns (they inherit the env), and run it
    now, so its hooks and env are in place before an engine's config is built. Every steering engine is built
    after this (`Engine`, `builder`)."""
    os.environ[ENGINE_FLAG] = "1"
    register()


def unregister() -> None:
    """Undo the steering hooks of `register` (tests: later engines in the process get plain vLLM; the LoRA fix
    stays, it only fixes vLLM)."""
    from . import state
    from .hooks import HOOKS

    state.unregister()
    for hook in reversed(HOOKS):
        hook.unregister()
