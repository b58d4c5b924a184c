"""The glue between a vLLM GPU attention backend and the steered-rows kernels (EXPERIMENTAL: never run on a GPU).

`steer_rows` takes what vLLM's GPU backends hand their `forward` (the step's queries, the paged KV cache as key and
value views [num_blocks, block_size, Hkv, D], the metadata's block table, the output buffer) and the step's steered
row groups (server/engine/attention_backend.py `AttentionRows.groups`), and overwrites the steered rows' output with
their exact biased attention from `kernels.dispatch.steered_rows_attention` (Triton on CUDA tensors; the torch path
on CPU tensors, which is how it is tested here). Unsteered rows' output is never written.

`register` / `unregister` install the GPU backend subclasses (server/engine/attention_backend_gpu.py) over vLLM's
FLASH_ATTN and TRITON_ATTN entries, on CUDA platforms only; this module imports no vLLM GPU code itself, so the CPU
engine never loads it.
"""
from __future__ import annotations

import math

import torch

from steerserve.kernels import dispatch

from . import vllm_compat

GPU_BACKEND_PATHS = {  # vllm_compat.GPU_ATTENTION_BACKENDS -> our subclass
    "FLASH_ATTN": "steerserve.server.engine.attention_backend_gpu.SteeringFlashAttentionBackend",
    "TRITON_ATTN": "steerserve.server.engine.attention_backend_gpu.SteeringTritonAttentionBackend",
}


def register(is_cuda: bool | None = None) -> bool:
    """Override vLLM's GPU attention backends with the steering subclasses if this is a CUDA platform (`is_cuda`:
    default vLLM's current platform). Returns whether it did."""
    if not (vllm_compat.platform_is_cuda() if is_cuda is None else is_cuda):
        return False
    vllm_compat.override_gpu_attention(GPU_BACKEND_PATHS)
    return True


def unregister() -> None:
    vllm_compat.override_gpu_attention(None)


def window_of(sliding_window) -> int:
    """A GPU impl's `sliding_window` ((-1, -1), or (window - 1, 0)) as the kernels take it (-1: none)."""
    if isinstance(sliding_window, tuple):
        return sliding_window[0] + 1 if sliding_window[0] >= 0 else -1
    return -1 if sliding_window is None else int(sliding_window)


def check_supported(kv_cache_dtype: str, alibi_slopes, sinks) -> None:
    """Raise `dispatch.UnsupportedAttention` for what the steered-rows kernels cannot read or compute."""
    if kv_cache_dtype not in ("auto", "float16", "bfloat16", "float32") or alibi_slopes is not None or sinks is not None:
        raise dispatch.UnsupportedAttention(
            f"attention steering cannot handle this layer (kv cache dtype {kv_cache_dtype}, alibi "
            f"{alibi_slopes is not None}, learned sinks {sinks is not None})")


def steer_rows(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_table: torch.Tensor,
               groups: list, layer: int, output: torch.Tensor, *, scale: float, sliding_window: int = -1,
               softcap: float = 0.0) -> None:
    """Overwrite the output of the groups' rows that steer `layer` with their biased attention.

    query [tokens, Hq, D] (or [tokens, Hq * D]); key_cache, value_cache [num_blocks, block_size, Hkv, D] views;
    block_table [rows, max_blocks] (the step's metadata); output [tokens, Hq * D] or [tokens, Hq, D], written in
    place on the steered rows' tokens only. groups: the step's `attention_backend.RowGroup`s (not imported: that
    module imports this one). The groups' index tensors live on the CPU (built once per step);
    they are moved to the queries' device here."""
    kv = dispatch.PagedKV.flash(key_cache, value_cache)
    block_size, device = key_cache.shape[1], query.device
    head_size = key_cache.shape[3]
    heads = query.shape[1] if query.dim() == 3 else query.shape[-1] // head_size
    q_all = query.reshape(-1, heads, head_size)
    out = output.view(-1, heads, head_size)
    for group in groups:
        if not group.steers(layer):
            continue
        R, q_len = group.tokens.shape
        rows = torch.tensor(group.rows, device=block_table.device)
        blocks = block_table.index_select(0, rows)[:, : math.ceil(int(group.n_keys.max()) / block_size)]
        tokens = group.tokens.to(device)
        mode = group.mode if layer in group.mode_layers else "softmax"
        o = dispatch.steered_rows_attention(
            q_all[tokens.flatten()].view(R, q_len, heads, head_size), kv, blocks, group.q_pos, group.n_keys,
            group.biases[layer], scale, sliding_window=sliding_window, softcap=softcap, mode=mode,
            power=group.power)
        if q_len == 1:  # decode rows: one scatter
            out[tokens[:, 0]] = o[:, 0].to(out.dtype)
        else:  # a prefill chunk is a group of its own: one row
            for i, n in enumerate(group.q_lens):
                out[tokens[i, :n]] = o[i, :n].to(out.dtype)
