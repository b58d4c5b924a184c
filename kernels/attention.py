"""GPU Triton kernels for per-request attention steering over vLLM's paged KV cache.

Two routes to the same math (ZeroTuning and span steering, docs/methods/attention-sink-and-spans.md):

- `paged_attention`: causal attention over the paged cache that adds per-(row, head) biases to the scores
  before the softmax: `sink_log_gain` (ln gamma) on key 0 and `key_bias` (e.g. ln alpha) on keys 0..Kb-1.
  One launch serves a mixed batch of decode rows and prefill chunks; it also returns the log-sum-exp.
- `sink_correction` (kernels/sink_correction.py): the exact post-hoc ZeroTuning correction of an unmodified
  FlashAttention output from its log-sum-exp, so a backend can keep FlashAttention and pay one dot product per
  (token, head) for steered rows.

Shared conventions (vLLM V1 metadata, GPU flash layout):
- q, out: [T, Hq, D], T = all query tokens of the batch; row r owns tokens query_start_loc[r]:query_start_loc[r+1].
- k_cache, v_cache: [num_blocks, block_size, Hkv, D], any strides; block_table: int32 [R, max_blocks].
- seq_lens[r] counts the keys of row r including this step's tokens; its q_len queries are the last q_len
  positions, so query i sits at absolute position seq_lens[r] - q_len + i and sees keys 0..that position.
- GQA: query head h reads KV head h // (Hq // Hkv).
- Biases never apply to the query at absolute position 0: it sees only key 0, so its output is v0 whatever the
  bias, and skipping it keeps gamma = 0 (ln gamma = -inf) from turning into 0/0.

`paged_attention(..., mode=)` also computes the softplus / re-weighted attention functions (kernels/attention_modes.py) of
docs/methods/attention-modes.md (LSSA, LSSAR, and softmax + re-weighting), with the same biases, in one or two
passes over the keys (a compile-time switch: the softmax kernel is unchanged). They never split the keys (below),
so small decode batches at long contexts leave SMs idle in those modes.

Decode batches too small to fill the GPU split their keys over several programs (flash-decoding) and merge the
partial results by log-sum-exp in a second small kernel.

Limits: block_size and head_dim may be any size (head_dim is padded to a power of two inside, at least 16);
fp16/bf16/fp32 inputs (fp32 scores use IEEE dots, not TF32), fp32 accumulation; no sliding window, logit
soft-capping, ALiBi or fp8 KV cache. Tiles are fixed by shape heuristics (no autotuning).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .attention_modes import MODES, mode_attention
from .paged_metadata import check_metadata, dot_precision
from .sink_correction import sink_correction

__all__ = ["paged_attention", "sink_correction"]


@triton.jit(do_not_specialize=["num_rows", "key_bias_len", "stride_br", "stride_bh"])
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_table_ptr, query_start_loc_ptr, seq_lens_ptr,
    sink_log_gain_ptr, key_bias_ptr, out_ptr, lse_ptr, part_out_ptr, part_lse_ptr,
    scale, num_rows, key_bias_len, block_size, kv_chunk, log_head_dim, power,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_btr, stride_btb,
    stride_sr, stride_sh,
    stride_br, stride_bh, stride_bk,
    stride_ot, stride_oh, stride_od,
    stride_lt, stride_lh,
    stride_pos, stride_pot, stride_poh, stride_pls, stride_plt,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SINK: tl.constexpr, HAS_KEY_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, NUM_SPLITS: tl.constexpr,
    MODE: tl.constexpr,
):
    # Program (q block, KV head): BLOCK_Q query tokens x the GROUP query heads sharing this KV head, packed into
    # the BLOCK_M rows of one tile, so each K/V tile is loaded once for the whole group (decode is memory-bound).
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)  # with NUM_SPLITS > 1, this program covers keys [split, split + 1) * kv_chunk

    # Row r owns global q blocks [first(r), first(r+1)) with first(r) = qsl[r] // BLOCK_Q + r: a grid of
    # T // BLOCK_Q + R programs covers every row without knowing the longest q_len on the host (no sync, and
    # the grid depends on shapes only, so the launch can be captured in a CUDA graph).
    lo = 0
    hi = num_rows
    while hi - lo > 1:
        mid = (lo + hi) // 2
        first_mid = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        lo = tl.where(first_mid <= q_block, mid, lo)
        hi = tl.where(first_mid <= q_block, hi, mid)
    row = lo
    q_start = tl.load(query_start_loc_ptr + row)
    q_len = tl.load(query_start_loc_ptr + row + 1) - q_start
    local_block = q_block - (q_start // BLOCK_Q + row)
    if local_block * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + row)
    context_len = seq_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_valid = offs_d < HEAD_DIM
    q_local = local_block * BLOCK_Q + offs_m // GROUP
    head = kv_head * GROUP + offs_m % GROUP
    m_valid = (offs_m < BLOCK_Q * GROUP) & (q_local < q_len)
    q_pos = context_len + q_local
    tok = q_start + q_local

    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    if HAS_SINK:
        sink = tl.load(sink_log_gain_ptr + row * stride_sr + head * stride_sh, mask=m_valid, other=0.0)
        sink = tl.where(q_pos > 0, sink, 0.0)
    else:
        sink = tl.zeros([BLOCK_M], tl.float32)  # never read: only names an argument of mode_attention
    steerable = q_pos > 0

    if MODE == 0:  # softmax: one online pass (flash attention)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)

        # Keys this block needs: up to the causal limit of its last valid query.
        kv_end = tl.minimum(seq_len, context_len + tl.minimum((local_block + 1) * BLOCK_Q, q_len))
        kv_start = 0
        if NUM_SPLITS > 1:
            kv_start = split * kv_chunk  # kv_chunk is a multiple of BLOCK_N, so key 0 stays first in its tile
            kv_end = tl.minimum(kv_end, kv_start + kv_chunk)
        for start_n in range(kv_start, kv_end, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_valid = offs_n < kv_end
            # Gather per key through the block table, so BLOCK_N is independent of the cache's block_size.
            # int64: block offsets of a large cache overflow int32 (150k blocks x 16 x 8 x 128 > 2**31).
            phys = tl.load(block_table_ptr + row * stride_btr + (offs_n // block_size) * stride_btb,
                           mask=n_valid, other=0).to(tl.int64)
            slot = offs_n % block_size
            k = tl.load(k_cache_ptr + phys[None, :] * stride_kb + slot[None, :] * stride_kt + kv_head * stride_kh
                        + offs_d[:, None] * stride_kd, mask=n_valid[None, :] & d_valid[:, None], other=0.0)
            v = tl.load(v_cache_ptr + phys[:, None] * stride_vb + slot[:, None] * stride_vt + kv_head * stride_vh
                        + offs_d[None, :] * stride_vd, mask=n_valid[:, None] & d_valid[None, :], other=0.0)

            s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale
            # Biases are plain additions: a zero bias leaves every score bit-identical to the unbiased kernel.
            if HAS_SINK:
                if start_n == 0:
                    s = s + tl.where(offs_n[None, :] == 0, sink[:, None], 0.0)
            if HAS_KEY_BIAS:
                if start_n < key_bias_len:
                    bias = tl.load(key_bias_ptr + row * stride_br + head[:, None] * stride_bh
                                   + offs_n[None, :] * stride_bk,
                                   mask=(m_valid & steerable)[:, None] & (offs_n < key_bias_len)[None, :],
                                   other=0.0)
                    s = s + bias
            s = tl.where((offs_n[None, :] <= q_pos[:, None]) & n_valid[None, :], s, float("-inf"))

            # Online softmax. A row may have seen only -inf so far (masked keys, or ln 0 biases): subtract 0 then,
            # so exp gives 0 instead of exp(-inf - -inf) = NaN.
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

        # A row with no finite score (only possible with -inf key biases) gets out = 0 and lse = -inf, not NaN.
        has_mass = l_i > 0.0
        out = acc / tl.where(has_mass, l_i, 1.0)[:, None]
        lse = tl.where(has_mass, m_i + tl.log(tl.where(has_mass, l_i, 1.0)), float("-inf"))
        tile = m_valid[:, None] & d_valid[None, :]
        if NUM_SPLITS == 1:
            tl.store(out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :] * stride_od,
                     out.to(out_ptr.dtype.element_ty), mask=tile)
            tl.store(lse_ptr + tok * stride_lt + head * stride_lh, lse, mask=m_valid)
        else:
            # Every split writes, empty ones too (out 0, lse -inf): the fp32 scratch is not initialised.
            tl.store(part_out_ptr + split * stride_pos + tok[:, None] * stride_pot + head[:, None] * stride_poh
                     + offs_d[None, :], out, mask=tile)
            tl.store(part_lse_ptr + split * stride_pls + tok * stride_plt + head, lse, mask=m_valid)
    else:  # lssa / lssar / reweight (module docstring): one or two passes in mode_attention
        mode_attention(
            q, q_pos, tok, row, head, kv_head, m_valid, steerable, sink, offs_d, d_valid, seq_len, context_len,
            local_block, q_len, k_cache_ptr, v_cache_ptr, block_table_ptr, key_bias_ptr, out_ptr, lse_ptr,
            scale, key_bias_len, block_size, log_head_dim, power,
            stride_kb, stride_kt, stride_kh, stride_kd, stride_vb, stride_vt, stride_vh, stride_vd,
            stride_btr, stride_btb, stride_br, stride_bh, stride_bk, stride_ot, stride_oh, stride_od,
            stride_lt, stride_lh,
            HEAD_DIM_PAD, BLOCK_M, BLOCK_Q, BLOCK_N, HAS_SINK, HAS_KEY_BIAS, DOT_PRECISION, MODE,
        )


@triton.jit
def _merge_splits_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, lse_ptr, num_heads,
    stride_pos, stride_pot, stride_poh, stride_pls, stride_plt,
    stride_ot, stride_oh, stride_od, stride_lt, stride_lh,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_H: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    # One program per token, all heads: combine the splits' normalised partials by their log-sum-exps.
    tok = tl.program_id(0)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    h_valid = offs_h < num_heads
    tile = h_valid[:, None] & (offs_d < HEAD_DIM)[None, :]
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    for s in tl.static_range(NUM_SPLITS):
        part_lse = tl.load(part_lse_ptr + s * stride_pls + tok * stride_plt + offs_h, mask=h_valid,
                           other=float("-inf"))
        m = tl.maximum(m, part_lse)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM_PAD], tl.float32)
    for s in tl.static_range(NUM_SPLITS):
        part_lse = tl.load(part_lse_ptr + s * stride_pls + tok * stride_plt + offs_h, mask=h_valid,
                           other=float("-inf"))
        weight = tl.exp(part_lse - m_safe)
        part = tl.load(part_out_ptr + s * stride_pos + tok * stride_pot + offs_h[:, None] * stride_poh
                       + offs_d[None, :], mask=tile, other=0.0)
        total += weight
        acc += weight[:, None] * part
    has_mass = total > 0.0
    out = acc / tl.where(has_mass, total, 1.0)[:, None]
    lse = tl.where(has_mass, m_safe + tl.log(tl.where(has_mass, total, 1.0)), float("-inf"))
    tl.store(out_ptr + tok * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=tile)
    tl.store(lse_ptr + tok * stride_lt + offs_h * stride_lh, lse, mask=h_valid)


def _tile_sizes(num_tokens: int, num_rows: int, group: int, head_dim_pad: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_Q, BLOCK_N): small query tiles for pure decode, larger ones once a prefill is in."""
    min_m = 16 if num_tokens <= num_rows else 64  # tl.dot needs >= 16 rows; prefill wants more reuse
    block_m = max(min_m, triton.next_power_of_2(group))
    block_n = 64 if head_dim_pad <= 128 else 32  # 3 pipelined K+V stages of D=256 must fit an A100's smem
    return block_m, block_m // group, block_n


def _auto_kv_splits(q: torch.Tensor, num_tokens: int, num_rows: int, num_kv_heads: int, max_keys: int) -> int:
    """Split the keys of a pure decode batch when (rows x KV heads) programs would leave most SMs idle."""
    if q.device.type != "cuda" or num_tokens != num_rows or max_keys < 2048:
        return 1
    programs = num_rows * num_kv_heads
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    if programs >= sms:
        return 1
    return min(16, triton.cdiv(2 * sms, programs), triton.cdiv(max_keys, 512))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scale: float, *,
                    sink_log_gain: torch.Tensor | None = None, key_bias: torch.Tensor | None = None,
                    out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
                    max_seq_len: int | None = None, num_kv_splits: int | None = None,
                    mode: str = "softmax", power: float = 15.0,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of a mixed batch over the paged cache, with optional per-request score biases.

    sink_log_gain: fp32 [R, Hq], added to the score of key 0 (ZeroTuning's ln gamma; -inf removes the sink).
    key_bias: fp32 [R, Hq, Kb], added to the scores of keys 0..Kb-1; keys >= Kb get 0 (span steering's ln alpha).
    Both may be given; they add. Neither applies to the query at absolute position 0 (module docstring).
    A None bias compiles its code out; a row whose biases are all zero gets bit-identical scores to the unbiased
    kernel (x + 0.0 == x), hence the same output.
    out, lse: optional preallocated outputs (e.g. the backend's output buffer), any strides.
    max_seq_len: host-side bound on seq_lens (vLLM's metadata has it); sizes the key splits. Default: the block
      table's capacity, which vLLM sizes for max_model_len, so pass it when splitting.
    num_kv_splits: split every row's keys over this many programs and merge by log-sum-exp (flash-decoding);
      None picks > 1 only for pure decode batches too small to fill the GPU. Depends on shapes only, so
      steered and unsteered calls on the same batch split alike (bit-identity of zero-bias rows holds).
      Softmax only: other modes always run unsplit (None gives 1; > 1 raises ValueError).
    mode: the attention function (docs/methods/attention-modes.md), a compile-time switch (softmax compiles as
      before). With p the query's absolute position, N = p + 1 its visible keys and b_j the biases above
      (sink + key_bias):
        "softmax"   a = softmax(scale q.k + b)
        "lssa"      a = phi / sum_j phi,  phi_j = softplus(ln(D) ln(N) q^.k^_j) exp(b_j)   (q^, k^ L2-normalised
                    over the head dim, 1e-12 floor on the norm as torch's normalize; `scale` is not used)
        "lssar"     lssa, then re-weighting;   "reweight": softmax, then re-weighting
        re-weighting  a'_j = r_j / (sum_j r_j + 1e-8),  r_j = ReLU(N a_j - o)^power,  o = 0 for p < 3 else 1
      lssa takes one pass over the keys; the re-weighting modes two (the row normaliser is needed before the
      threshold), so they read K twice. Norms, weights and sums are fp32 (the weights are rounded to the KV dtype
      for the weights x V dot, as in softmax); r is computed relative to the row's largest N a_j - o, so N ~ 8k
      with power 15 does not overflow. In the softplus modes a bias multiplies a key's weight by e^b (-inf removes
      the key; b above ~80 overflows fp32).
    power: the re-weighting exponent (> 0; lssar/reweight only).
    Returns out [T, Hq, D] in q's dtype and lse fp32 [T, Hq]. softmax: the natural-log log-sum-exp of the scaled,
    biased scores over the visible keys (-inf, with out = 0, for a query whose every visible key has a -inf
    bias). Other modes: the log of the pass-1 normaliser, i.e. ln sum_j phi_j for lssa/lssar and the softmax
    log-sum-exp for reweight (-inf, with out = 0, when it is 0); it does not normalise a re-weighted output (so
    sink_correction does not apply to them). A re-weighted row whose a_j are all equal (N a_j - o <= 0 for every j)
    gets out = 0, as the formula gives.
    """
    num_tokens, num_heads, head_dim, num_kv_heads, num_rows = check_metadata(
        q, k_cache, v_cache, block_table, query_start_loc, seq_lens)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    if mode != "softmax":
        if num_kv_splits is not None and num_kv_splits > 1:
            raise ValueError(f"num_kv_splits > 1 (split keys) is implemented for mode='softmax' only, not {mode!r}")
        num_kv_splits = 1
    if not (power > 0 and math.isfinite(power)):
        raise ValueError(f"power must be finite and > 0, got {power}")
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(q)
    if lse is None:
        lse = torch.empty((num_tokens, num_heads), dtype=torch.float32, device=q.device)
    if num_tokens == 0 or num_rows == 0:
        return out, lse
    if sink_log_gain is not None and (sink_log_gain.shape != (num_rows, num_heads)
                                      or sink_log_gain.dtype != torch.float32):
        raise ValueError(f"sink_log_gain must be fp32 [{num_rows}, {num_heads}], got "
                         f"{sink_log_gain.dtype} {list(sink_log_gain.shape)}")
    if key_bias is not None and (key_bias.dim() != 3 or key_bias.shape[:2] != (num_rows, num_heads)
                                 or key_bias.dtype != torch.float32):
        raise ValueError(f"key_bias must be fp32 [{num_rows}, {num_heads}, Kb], got "
                         f"{key_bias.dtype} {list(key_bias.shape)}")

    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    block_m, block_q, block_n = _tile_sizes(num_tokens, num_rows, group, head_dim_pad)
    max_keys = max_seq_len if max_seq_len is not None else block_table.shape[1] * k_cache.shape[1]
    if num_kv_splits is None:
        num_kv_splits = _auto_kv_splits(q, num_tokens, num_rows, num_kv_heads, max_keys)
    kv_chunk = triton.cdiv(triton.cdiv(max(max_keys, 1), num_kv_splits), block_n) * block_n
    num_kv_splits = triton.cdiv(max(max_keys, 1), kv_chunk)  # no split may start past every row's keys
    if num_kv_splits > 1:
        part_out = torch.empty((num_kv_splits, num_tokens, num_heads, head_dim), dtype=torch.float32,
                               device=q.device)
        part_lse = torch.empty((num_kv_splits, num_tokens, num_heads), dtype=torch.float32, device=q.device)
    else:  # unused: the NUM_SPLITS == 1 kernel writes out and lse directly
        part_out, part_lse = out, lse
    # Unused bias pointers still need a tensor argument; their branches are compiled out.
    sink = sink_log_gain if sink_log_gain is not None else lse
    bias = key_bias if key_bias is not None else lse.unsqueeze(-1)
    grid = (num_tokens // block_q + num_rows, num_kv_heads, num_kv_splits)
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, block_table, query_start_loc, seq_lens, sink, bias, out, lse, part_out, part_lse,
        scale, num_rows, bias.shape[2] if key_bias is not None else 0, k_cache.shape[1], kv_chunk,
        math.log(head_dim), float(power),
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_table.stride(),
        *sink.stride()[:2], *bias.stride(), *out.stride(), *lse.stride(),
        *part_out.stride()[:3], *part_lse.stride()[:2],
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, GROUP=group,
        BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n,
        HAS_SINK=sink_log_gain is not None, HAS_KEY_BIAS=key_bias is not None,
        DOT_PRECISION=dot_precision(q.dtype), NUM_SPLITS=num_kv_splits, MODE=MODES[mode], num_warps=4,
    )
    if num_kv_splits > 1:
        _merge_splits_kernel[(num_tokens,)](
            part_out, part_lse, out, lse, num_heads,
            *part_out.stride()[:3], *part_lse.stride()[:2], *out.stride(), *lse.stride(),
            HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK_H=triton.next_power_of_2(num_heads),
            NUM_SPLITS=num_kv_splits, num_warps=4,
        )
    return out, lse
