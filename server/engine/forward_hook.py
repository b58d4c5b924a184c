"""Per-step hooks: one wrapper around vLLM's `GPUModelRunner._model_forward`, shared by the steering methods that
need to know, for each forward, which tokens belong to which row of the persistent batch.

`_model_forward` runs after the step's inputs are prepared (`query_start_loc`, `positions`) and around the model
itself, so a hook registered with `add` gets `(runner, positions)` just before the forward and returns a callable
to run just after it (or None: nothing to do this step). Hooks keep their per-step tables in module globals that
their model-side hooks read; steps do not overlap within a worker process.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from . import vllm_compat

Hook = Callable[[object, torch.Tensor], Callable[[], None] | None]
_HOOKS: list[Hook] = []


def row_starts(runner) -> list[int]:
    """`query_start_loc` of this step: row r's tokens are [starts[r], starts[r + 1]) of the step's tokens."""
    return vllm_compat.step_row_starts(runner)


def add(hook: Hook) -> None:
    """Run `hook` around every forward of this process's engines; installs the wrapper on first use."""
    runner = vllm_compat.model_runner_class()
    if hook not in _HOOKS:
        _HOOKS.append(hook)
    original = getattr(runner, vllm_compat.MODEL_FORWARD)
    if not getattr(original, "__steerserve__", False):
        setattr(runner, vllm_compat.MODEL_FORWARD, _wrapped(original))


def remove(hook: Hook) -> None:
    """Undo `add` (tests); the wrapper goes with the last hook."""
    runner = vllm_compat.model_runner_class()
    if hook in _HOOKS:
        _HOOKS.remove(hook)
    fn = runner.__dict__[vllm_compat.MODEL_FORWARD]
    if not _HOOKS and getattr(fn, "__steerserve__", False):
        setattr(runner, vllm_compat.MODEL_FORWARD, fn.__wrapped__)


def _wrapped(original):
    def model_forward(self, input_ids=None, positions=None, *args, **kwargs):
        after = [done for hook in _HOOKS if (done := hook(self, positions)) is not None] \
            if positions is not None else []
        try:
            return original(self, input_ids, positions, *args, **kwargs)
        finally:
            for done in after:
                done()

    model_forward.__steerserve__ = True  # type: ignore[attr-defined]
    model_forward.__wrapped__ = original  # type: ignore[attr-defined]
    return model_forward
