"""Triton device functions of the non-softmax attention modes of `kernels.attention.paged_attention`: LSSA,
LSSAR and softmax + re-weighting (docs/methods/attention-modes.md), one or two passes over the keys. They are
compiled into the paged-attention kernel (the mode is a constexpr), never launched on their own.
"""
from __future__ import annotations

import triton
import triton.language as tl

# Attention modes (the `mode` argument of paged_attention; a constexpr, so each mode compiles its own kernel).
MODES = {"softmax": 0, "lssa": 1, "lssar": 2, "reweight": 3}


@triton.jit
def softplus(x):
    # max(x, 0) + log1p(exp(-|x|)), with log1p(e) = log(u) * e / (u - 1), u = 1 + e (accurate to a few ulps
    # without libdevice; u == 1 means e is below half an ulp of 1, where log1p(e) = e).
    e = tl.exp(-tl.abs(x))
    u = 1.0 + e
    log1p = tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
    return tl.maximum(x, 0.0) + log1p


@triton.jit
def mode_tile(q, q_gain, start_n, kv_end, q_pos, row, head, kv_head, m_valid, steerable, sink, offs_d, d_valid,
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
        w = softplus(s * q_gain[:, None] / k_norm[None, :])
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
def mode_attention(
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
        w, phys, slot, n_valid, visible = mode_tile(
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
            w, phys, slot, n_valid, visible = mode_tile(
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
