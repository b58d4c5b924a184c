"""GPU Triton kernels for per-request attention steering over vLLM's paged KV cache.

Two routes to the same math (ZeroTuning and span steering, docs/methods/attention-sink-and-spans.md):

- `paged_attention`: causal attention over the paged cache that adds per-(row, head) biases to the scores
  before the softmax: `sink_log_gain` (ln gamma) on key 0 and `key_bias` (e.g. ln alpha) on keys 0..Kb-1.
  One launch serves a mixed batch of decode rows and prefill chunks; it also returns the log-sum-exp.
- `sink_correction`: the exact post-hoc ZeroTuning correction of an unmodified FlashAttention output from its
  log-sum-exp, so a backend can keep FlashAttention and pay one dot product per (token, head) for steered rows.

Shared conventions (vLLM V1 metadata, GPU flash layout):
- q, out: [T, Hq, D], T = all query tokens of the batch; row r owns tokens query_start_loc[r]:query_start_loc[r+1].
- k_cache, v_cache: [num_blocks, block_size, Hkv, D], any strides; block_table: int32 [R, max_blocks].
- seq_lens[r] counts the keys of row r including this step's tokens; its q_len queries are the last q_len
  positions, so query i sits at absolute position seq_lens[r] - q_len + i and sees keys 0..that position.
- GQA: query head h reads KV head h // (Hq // Hkv).
- Biases never apply to the query at absolute position 0: it sees only key 0, so its output is v0 whatever the
  bias, and skipping it keeps gamma = 0 (ln gamma = -inf) from turning into 0/0.

`paged_attention(..., mode=)` also computes the softplus / re-weighted attention functions of
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

__all__ = ["paged_attention", "sink_correction"]


# Attention modes (the `mode` argument of paged_attention; a constexpr, so each mode compiles its own kernel).
_MODES = {"softmax": 0, "lssa": 1, "lssar": 2, "reweight": 3}


@triton.jit
def _softplus(x):
    # max(x, 0) + log1p(exp(-|x|)), with log1p(e) = log(u) * e / (u - 1), u = 1 + e (accurate to a few ulps
    # without libdevice; u == 1 means e is below half an ulp of 1, where log1p(e) = e).
    e = tl.exp(-tl.abs(x))
    u = 1.0 + e
    log1p = tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
    return tl.maximum(x, 0.0) + log1p


@triton.jit
def _mode_tile(q, q_gain, start_n, kv_end, q_pos, row, head, kv_head, m_valid, steerable, sink, offs_d, d_valid,
               k_cache_ptr, block_table_ptr, key_bias_ptr, scale, key_bias_len, block_size,
               stride_kb, stride_kt, stride_kh, stride_kd, stride_btr, stride_btb, stride_br, stride_bh, stride_bk,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_SINK: tl.constexpr, HAS_KEY_BIAS: tl.constexpr,
               DOT_PRECISION: tl.constexpr, SOFTPLUS: tl.constexpr):
    """One key tile of a non-softmax mode: (w, phys, slot, n_valid, visible) with w [BLOCK_M, BLOCK_N] the biased
    softplus weights phi * exp(bias) (0 on invisible keys) if SOFTPLUS, else the biased scaled scores
    scale q.k + bias (-inf on invisible keys). Gathers K as the softmax loop does."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_valid = offs_n < kv_end
    phys = tl.load(block_table_ptr + row * stride_btr + (offs_n // block_size) * stride_btb,
                   mask=n_valid, other=0).to(tl.int64)
    slot = offs_n % block_size
    k = tl.load(k_cache_ptr + phys[None, :] * stride_kb + slot[None, :] * stride_kt + kv_head * stride_kh
                + offs_d[:, None] * stride_kd, mask=n_valid[None, :] & d_valid[:, None], other=0.0)
    s = tl.dot(q, k, input_precision=DOT_PRECISION)
    bias = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if HAS_SINK:
        if start_n == 0:
            bias += tl.where(offs_n[None, :] == 0, sink[:, None], 0.0)
    if HAS_KEY_BIAS:
        if start_n < key_bias_len:
            bias += tl.load(key_bias_ptr + row * stride_br + head[:, None] * stride_bh
                            + offs_n[None, :] * stride_bk,
                            mask=(m_valid & steerable)[:, None] & (offs_n < key_bias_len)[None, :], other=0.0)
    visible = (offs_n[None, :] <= q_pos[:, None]) & n_valid[None, :]
    if SOFTPLUS:
        # q^.k^ = q.k / (|q| |k|) (torch's normalize: x / max(|x|, 1e-12)); q_gain = ln(D) ln(p+1) / |q|.
        k32 = k.to(tl.float32)
        k_norm = tl.maximum(tl.sqrt(tl.sum(k32 * k32, 0)), 1e-12)
        w = _softplus(s * q_gain[:, None] / k_norm[None, :])
        if HAS_SINK or HAS_KEY_BIAS:
            w = w * tl.exp(bias)
        w = tl.where(visible, w, 0.0)
    else:
        s = s * scale
        if HAS_SINK or HAS_KEY_BIAS:
            s = s + bias
        w = tl.where(visible, s, float("-inf"))
    return w, phys, slot, n_valid, visible


@triton.jit
def _mode_attention(
    q, q_pos, tok, row, head, kv_head, m_valid, steerable, sink, offs_d, d_valid, seq_len, context_len,
    local_block, q_len, k_cache_ptr, v_cache_ptr, block_table_ptr, key_bias_ptr, out_ptr, lse_ptr,
    scale, key_bias_len, block_size, log_head_dim, power,
    stride_kb, stride_kt, stride_kh, stride_kd, stride_vb, stride_vt, stride_vh, stride_vd,
    stride_btr, stride_btb, stride_br, stride_bh, stride_bk, stride_ot, stride_oh, stride_od,
    stride_lt, stride_lh,
    HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SINK: tl.constexpr, HAS_KEY_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, MODE: tl.constexpr,
):
    # The non-softmax modes of _paged_attention_kernel (MODE 1 lssa, 2 lssar, 3 reweight), for one program's
    # query tile. Pass 1 gets each query's normaliser: for lssa(r) Z = sum phi (phi = softplus weights, no max
    # needed: phi <= ln(D) ln(p+1) + ln 2) and max phi; for reweight the softmax max m and sum l. lssa is then
    # done in the same pass (out = sum phi v / Z). The re-weighting modes need a = phi / Z (or exp(s - m) / l)
    # before the ReLU threshold, so a second pass recomputes the weights and accumulates r v and sum r.
    SOFTPLUS: tl.constexpr = MODE == 1 or MODE == 2
    kv_end = tl.minimum(seq_len, context_len + tl.minimum((local_block + 1) * BLOCK_Q, q_len))
    pos_f = q_pos.to(tl.float32)
    q_gain = tl.zeros([BLOCK_M], tl.float32)
    if SOFTPLUS:
        q32 = q.to(tl.float32)
        q_gain = log_head_dim * tl.log(pos_f + 1.0) / tl.maximum(tl.sqrt(tl.sum(q32 * q32, 1)), 1e-12)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # softplus: max phi (0 once a key is seen)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    for start_n in range(0, kv_end, BLOCK_N):
        w, phys, slot, n_valid, visible = _mode_tile(
            q, q_gain, start_n, kv_end, q_pos, row, head, kv_head, m_valid, steerable, sink, offs_d, d_valid,
            k_cache_ptr, block_table_ptr, key_bias_ptr, scale, key_bias_len, block_size,
            stride_kb, stride_kt, stride_kh, stride_kd, stride_btr, stride_btb, stride_br, stride_bh, stride_bk,
            BLOCK_M, BLOCK_N, HAS_SINK, HAS_KEY_BIAS, DOT_PRECISION, SOFTPLUS)
        if SOFTPLUS:
            m_i = tl.maximum(m_i, tl.max(w, 1))
            l_i += tl.sum(w, 1)
            if MODE == 1:
                v = tl.load(v_cache_ptr + phys[:, None] * stride_vb + slot[:, None] * stride_vt
                            + kv_head * stride_vh + offs_d[None, :] * stride_vd,
                            mask=n_valid[:, None] & d_valid[None, :], other=0.0)
                acc += tl.dot(w.to(v.dtype), v, input_precision=DOT_PRECISION)
        else:  # online softmax statistics only (same -inf guard as the softmax loop)
            m_new = tl.maximum(m_i, tl.max(w, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(w - m_safe[:, None]), 1)
            m_i = m_new

    has_mass = l_i > 0.0
    l_safe = tl.where(has_mass, l_i, 1.0)
    if SOFTPLUS:
        lse = tl.where(has_mass, tl.log(l_safe), float("-inf"))  # ln Z
    else:
        lse = tl.where(has_mass, m_i + tl.log(l_safe), float("-inf"))  # the softmax's log-sum-exp
    if MODE == 1:
        out = acc / l_safe[:, None]
    else:
        # r_j = ReLU(N a_j - o)^power with N = p + 1 (absolute position), o = 0 for p < 3 else 1. N a_j reaches
        # N ~ 8k, and 8192^15 overflows fp32, so pass 2 accumulates r_j / bound^power with bound = max_j (N a_j - o)
        # = N max(a) - o (max a = max phi / Z, or exp(0) / l): every term is <= 1 (up to rounding) and the
        # ratio is exact, the 1e-8 of a' = r / (sum r + 1e-8) becoming 1e-8 / bound^power (computed in log2).
        # bound <= 0 (all a_j = 1/N): r = 0, out = 0.
        n_keys = pos_f + 1.0
        offset = tl.where(q_pos < 3, 0.0, 1.0)
        if SOFTPLUS:
            a_max = m_i / l_safe
            a_norm = 1.0 / l_safe  # a = phi / Z
        else:
            a_max = 1.0 / l_safe
            a_norm = 1.0 / l_safe  # a = exp(s - m) / l
        m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
        bound = n_keys * a_max - offset
        active = has_mass & (bound > 0.0)
        inv_bound = 1.0 / tl.where(active, bound, 1.0)
        r_sum = tl.zeros([BLOCK_M], tl.float32)
        for start_n in range(0, kv_end, BLOCK_N):
            w, phys, slot, n_valid, visible = _mode_tile(
                q, q_gain, start_n, kv_end, q_pos, row, head, kv_head, m_valid, steerable, sink, offs_d, d_valid,
                k_cache_ptr, block_table_ptr, key_bias_ptr, scale, key_bias_len, block_size,
                stride_kb, stride_kt, stride_kh, stride_kd, stride_btr, stride_btb, stride_br, stride_bh,
                stride_bk, BLOCK_M, BLOCK_N, HAS_SINK, HAS_KEY_BIAS, DOT_PRECISION, SOFTPLUS)
            if SOFTPLUS:
                a = w * a_norm[:, None]
            else:
                a = tl.exp(w - m_safe[:, None]) * a_norm[:, None]
            x = (n_keys[:, None] * a - offset[:, None]) * inv_bound[:, None]
            r = tl.where(visible & active[:, None] & (x > 0.0), tl.exp2(power * tl.log2(tl.maximum(x, 1e-30))), 0.0)
            r_sum += tl.sum(r, 1)
            v = tl.load(v_cache_ptr + phys[:, None] * stride_vb + slot[:, None] * stride_vt + kv_head * stride_vh
                        + offs_d[None, :] * stride_vd,
                        mask=n_valid[:, None] & d_valid[None, :], other=0.0)
            acc += tl.dot(r.to(v.dtype), v, input_precision=DOT_PRECISION)
        # 1e-8 / bound^power, capped at 2^100 (out <= N max|v| / 2^100 is 0 then, as it is without the cap).
        eps = tl.exp2(tl.minimum(-26.575424759098897 - power * tl.log2(tl.where(active, bound, 1.0)), 100.0))
        out = tl.where(active[:, None], acc / (r_sum + eps)[:, None], 0.0)
    tile = m_valid[:, None] & d_valid[None, :]
    tl.store(out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=tile)
    tl.store(lse_ptr + tok * stride_lt + head * stride_lh, lse, mask=m_valid)


# Batch-dependent ints are not specialised (== 1, % 16): one compiled variant serves every batch shape.
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
        sink = tl.zeros([BLOCK_M], tl.float32)  # never read: only names an argument of _mode_attention
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
    else:  # lssa / lssar / reweight (module docstring): one or two passes in _mode_attention
        _mode_attention(
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


def _check_metadata(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
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


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 models should get fp32 scores; the default TF32 would cost ~1e-3 relative error on GPU.
    return "ieee" if dtype == torch.float32 else "tf32"


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
    num_tokens, num_heads, head_dim, num_kv_heads, num_rows = _check_metadata(
        q, k_cache, v_cache, block_table, query_start_loc, seq_lens)
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {sorted(_MODES)}, got {mode!r}")
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
        DOT_PRECISION=_dot_precision(q.dtype), NUM_SPLITS=num_kv_splits, MODE=_MODES[mode], num_warps=4,
    )
    if num_kv_splits > 1:
        _merge_splits_kernel[(num_tokens,)](
            part_out, part_lse, out, lse, num_heads,
            *part_out.stride()[:3], *part_lse.stride()[:2], *out.stride(), *lse.stride(),
            HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK_H=triton.next_power_of_2(num_heads),
            NUM_SPLITS=num_kv_splits, num_warps=4,
        )
    return out, lse


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
    num_tokens, num_heads, head_dim, num_kv_heads, num_rows = _check_metadata(
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
