"""The exact post-hoc ZeroTuning correction of an unmodified FlashAttention output from its log-sum-exp (Triton):
a backend can keep FlashAttention and pay one dot product per (token, head) for steered rows. Conventions as in
`kernels.attention` (vLLM V1 metadata, GPU flash layout).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .paged_metadata import check_metadata

__all__ = ["sink_correction"]


@triton.jit(do_not_specialize=["num_pairs", "num_rows", "search_steps"])
def _sink_correction_kernel(
    out_ptr, lse_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_table_ptr, query_start_loc_ptr, seq_lens_ptr,
    log_gain_ptr,
    scale, num_pairs, num_heads, num_rows, search_steps,
    stride_ot, stride_oh, stride_od,
    stride_lt, stride_lh,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kd,
    stride_vb, stride_vh, stride_vd,
    stride_btr,
    stride_gr, stride_gh,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, GROUP: tl.constexpr, BLOCK: tl.constexpr,
):
    # One lane per (token, head) pair; pairs are flattened token-major so a block mostly stays in one row.
    pair = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = pair < num_pairs
    tok = pair // num_heads
    head = pair % num_heads

    # Row of each token: the last r with query_start_loc[r] <= tok (vectorised binary search).
    lo = tl.zeros([BLOCK], tl.int32)
    hi = tl.zeros([BLOCK], tl.int32) + num_rows
    for _ in range(search_steps):
        mid = (lo + hi) // 2
        go_right = tl.load(query_start_loc_ptr + mid, mask=in_range, other=0) <= tok
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid)
    row = lo
    q_start = tl.load(query_start_loc_ptr + row, mask=in_range, other=0)
    q_len = tl.load(query_start_loc_ptr + row + 1, mask=in_range, other=0) - q_start
    pos = tl.load(seq_lens_ptr + row, mask=in_range, other=0) - q_len + (tok - q_start)

    log_gain = tl.load(log_gain_ptr + row * stride_gr + head * stride_gh, mask=in_range, other=0.0)
    # Unsteered pairs are neither read nor written: they stay bit-identical. Position 0 sees only key 0.
    active = in_range & (log_gain != 0.0) & (pos > 0)

    offs_d = tl.arange(0, HEAD_DIM_PAD)
    tile = active[:, None] & (offs_d < HEAD_DIM)[None, :]
    kv_head = head // GROUP
    # Key 0 is slot 0 of the row's first block; int64 as in the attention kernel.
    first_block = tl.load(block_table_ptr + row * stride_btr, mask=active, other=0).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=tile, other=0.0).to(tl.float32)
    k0 = tl.load(k_cache_ptr + first_block[:, None] * stride_kb + kv_head[:, None] * stride_kh
                 + offs_d[None, :] * stride_kd, mask=tile, other=0.0).to(tl.float32)
    v0 = tl.load(v_cache_ptr + first_block[:, None] * stride_vb + kv_head[:, None] * stride_vh
                 + offs_d[None, :] * stride_vd, mask=tile, other=0.0).to(tl.float32)
    o_ptrs = out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :] * stride_od
    o = tl.load(o_ptrs, mask=tile, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + tok * stride_lt + head * stride_lh, mask=active, other=0.0)

    a0 = tl.exp(tl.sum(q * k0, 1) * scale - lse)  # key 0's share of the unmodified softmax
    w0 = (tl.exp(log_gain) - 1.0) * a0
    # 1 + (g - 1) a0 >= 1 - a0 >= 0; it is 0 only for g = 0 with all mass on the sink, where the other keys'
    # distribution is lost anyway: clamp to stay finite (use paged_attention's bias for that regime).
    denom = tl.maximum(1.0 + w0, 1e-30)
    corrected = (o + w0[:, None] * v0) / denom[:, None]
    tl.store(o_ptrs, corrected.to(out_ptr.dtype.element_ty), mask=tile)


def sink_correction(out: torch.Tensor, lse: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, block_table: torch.Tensor, query_start_loc: torch.Tensor,
                    seq_lens: torch.Tensor, log_gain: torch.Tensor, scale: float) -> torch.Tensor:
    """Apply ZeroTuning's gain post hoc to an unmodified attention output, in place; returns `out`.

    out: [T, Hq, D] attention output of q over the same keys (FlashAttention's, or paged_attention without
      biases); corrected in place to what `paged_attention(..., sink_log_gain=log_gain)` gives:
      a0 = exp(scale * q.k0 - lse), g = exp(log_gain[r, h]), out' = (out + (g-1) a0 v0) / (1 + (g-1) a0),
      in fp32, with k0/v0 read from the cache (block_table[r, 0], slot 0, KV head h // (Hq // Hkv)).
    lse: fp32 [T, Hq], any strides. FlashAttention's varlen `softmax_lse` is [Hq, T]: pass `lse.t()` (no copy).
    log_gain: fp32 [R, Hq] (ln gamma). Pairs with log_gain == 0, and queries at absolute position 0, are not
      touched at all (bit-identical). The other metadata is as for `paged_attention`.
    Precision: exact in fp32 up to rounding, but the result inherits out's rounding (fp16/bf16) and loses
    relative precision like eps / (1 - a0) as gamma -> 0 on heads that put nearly all mass on the sink.
    """
    num_tokens, num_heads, head_dim, num_kv_heads, num_rows = check_metadata(
        q, k_cache, v_cache, block_table, query_start_loc, seq_lens)
    if out.shape != q.shape or lse.shape != (num_tokens, num_heads) or lse.dtype != torch.float32:
        raise ValueError(f"out must be [T, Hq, D] like q and lse fp32 [T, Hq]; got {list(out.shape)} and "
                         f"{lse.dtype} {list(lse.shape)} (FlashAttention's [Hq, T] lse: pass lse.t())")
    if log_gain.shape != (num_rows, num_heads) or log_gain.dtype != torch.float32:
        raise ValueError(f"log_gain must be fp32 [{num_rows}, {num_heads}], got "
                         f"{log_gain.dtype} {list(log_gain.shape)}")
    if num_tokens == 0 or num_rows == 0:
        return out
    num_pairs = num_tokens * num_heads
    block = 32
    _sink_correction_kernel[(triton.cdiv(num_pairs, block),)](
        out, lse, q, k_cache, v_cache, block_table, query_start_loc, seq_lens, log_gain,
        scale, num_pairs, num_heads, num_rows, max(1, num_rows.bit_length()),
        *out.stride(), *lse.stride(), *q.stride(),
        k_cache.stride(0), k_cache.stride(2), k_cache.stride(3),
        v_cache.stride(0), v_cache.stride(2), v_cache.stride(3),
        block_table.stride(0), *log_gain.stride(),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim), GROUP=num_heads // num_kv_heads,
        BLOCK=block, num_warps=4,
    )
    return out
