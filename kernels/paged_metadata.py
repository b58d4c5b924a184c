"""Checks of the vLLM V1 paged-attention metadata shared by the Triton kernels (`kernels.attention`,
`kernels.sink_correction`), and the dot precision they use per dtype."""
from __future__ import annotations

import torch


def check_metadata(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                    query_start_loc: torch.Tensor, seq_lens: torch.Tensor) -> tuple[int, int, int, int, int]:
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError("q must be [T, Hq, D]; k_cache and v_cache [num_blocks, block_size, Hkv, D]")
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim or num_heads % num_kv_heads:
        raise ValueError(f"head_dim {head_dim} vs cache {k_cache.shape[3]}, or Hq={num_heads} not a multiple "
                         f"of Hkv={num_kv_heads}")
    num_rows = seq_lens.shape[0]
    if query_start_loc.shape[0] != num_rows + 1 or block_table.shape[0] < num_rows:
        raise ValueError("query_start_loc must be [R+1] and block_table [>=R, max_blocks] for seq_lens [R]")
    for name, t in (("block_table", block_table), ("query_start_loc", query_start_loc), ("seq_lens", seq_lens)):
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}")
    return num_tokens, num_heads, head_dim, num_kv_heads, num_rows


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 models should get fp32 scores; the default TF32 would cost ~1e-3 relative error on GPU.
    return "ieee" if dtype == torch.float32 else "tf32"
