"""The attention modes of `paged_attention` (mode="lssa" | "lssar" | "reweight", docs/methods/attention-modes.md) against an
independent float64 torch reference, on the mixed batch of test_attention_kernels.py (decode rows, prefill chunks,
a 1-token prompt, GQA, sink and key biases), fp32 under the Triton interpreter when there is no GPU.
"""
from __future__ import annotations

import math

import pytest
import torch

from tests.kernels.test_attention_kernels import (
    DEVICE,
    HQ,
    SCALE,
    _interpreter,  # noqa: F401 (autouse: TRITON_INTERPRET per test)
    kernels,
    make_batch,
    make_biases,
)

MODES = ("softmax", "lssa", "lssar", "reweight")
# Re-weighting raises a to the 15th power, which multiplies relative errors of a by ~15 N a / (N a - o): moving q by
# half an fp32 ulp moves the float64 reference output by up to ~7e-6 on this batch, so fp32 gets 3e-5 there.
ATOL = {"softmax": 1e-5, "lssa": 1e-5, "lssar": 3e-5, "reweight": 3e-5}


def reference_modes(q, k_cache, v_cache, block_table, query_start_loc, seq_lens, scale, *, mode,
                    power=15.0, sink_log_gain=None, key_bias=None):
    """Per row, in float64: gather K/V, biases b (skipping the query at position 0), then
    softmax: a = softmax(scale q.k + b);  lssa: a = phi / sum phi, phi = softplus(ln(D) ln(p+1) q^.k^) e^b;
    re-weighting (lssar, reweight): a' = r / (sum r + 1e-8), r = relu((p+1) a - o)^power, o = [p >= 3].
    lse: the softmax log-sum-exp (softmax, reweight) or ln sum phi (lssa, lssar)."""
    num_tokens, num_heads, head_dim = q.shape
    block_size, group = k_cache.shape[1], num_heads // k_cache.shape[2]
    out = torch.zeros(num_tokens, num_heads, head_dim, dtype=torch.float64)
    lse = torch.zeros(num_tokens, num_heads, dtype=torch.float64)
    qsl, lens = query_start_loc.tolist(), seq_lens.tolist()
    for r, seq_len in enumerate(lens):
        start, end = qsl[r], qsl[r + 1]
        keys = torch.arange(seq_len)
        phys = block_table[r, keys // block_size].long().cpu()
        k = k_cache.cpu()[phys, keys % block_size].double().repeat_interleave(group, dim=1)  # [n, Hq, D]
        v = v_cache.cpu()[phys, keys % block_size].double().repeat_interleave(group, dim=1)
        qr = q[start:end].cpu().double()
        pos = seq_len - (end - start) + torch.arange(end - start)
        bias = torch.zeros(num_heads, end - start, seq_len, dtype=torch.float64)
        if sink_log_gain is not None:
            bias[:, :, 0] += sink_log_gain[r].cpu().double()[:, None]
        if key_bias is not None:
            width = min(key_bias.shape[2], seq_len)
            bias[:, :, :width] += key_bias[r, :, None, :width].cpu().double()
        bias[:, pos == 0, :] = 0.0
        hidden = keys[None, None, :] > pos[None, :, None]
        if mode in ("lssa", "lssar"):
            cos = torch.einsum("ihd,jhd->hij", qr / qr.norm(dim=-1, keepdim=True).clamp_min(1e-12),
                               k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12))
            phi = torch.nn.functional.softplus(math.log(head_dim) * torch.log(pos + 1.0)[None, :, None] * cos)
            phi = (phi * bias.exp()).masked_fill(hidden, 0.0)
            z = phi.sum(-1)
            lse[start:end] = z.log().T
            a = phi / z[..., None]
        else:
            scores = (torch.einsum("ihd,jhd->hij", qr, k) * scale + bias).masked_fill(hidden, float("-inf"))
            lse[start:end] = torch.logsumexp(scores, -1).T
            a = torch.softmax(scores, -1)
        if mode in ("lssar", "reweight"):
            n = (pos + 1.0)[None, :, None]
            rw = torch.relu(n * a - (pos >= 3).double()[None, :, None]) ** power
            a = rw / (rw.sum(-1, keepdim=True) + 1e-8)
        out[start:end] = torch.einsum("hij,jhd->ihd", a, v)
    return out.to(q.dtype), lse.float()


@pytest.mark.parametrize("mode", MODES)
def test_modes_match_reference_on_the_mixed_batch(mode):
    batch = make_batch(torch.float32)
    sink, key_bias = make_biases()
    out, lse = kernels.paged_attention(**batch, scale=SCALE, sink_log_gain=sink, key_bias=key_bias, mode=mode)
    ref_out, ref_lse = reference_modes(**batch, scale=SCALE, mode=mode, sink_log_gain=sink, key_bias=key_bias)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    torch.testing.assert_close(out.cpu(), ref_out, atol=ATOL[mode], rtol=0)
    torch.testing.assert_close(lse.cpu(), ref_lse, atol=1e-5, rtol=0)
    if mode != "softmax":  # the mode must change the result (else this test could not catch a softmax fallback)
        soft_out, _ = reference_modes(**batch, scale=SCALE, mode="softmax", sink_log_gain=sink, key_bias=key_bias)
        assert (ref_out - soft_out).abs().max() > 0.1


def test_modes_with_padded_head_dim_and_odd_group():
    # head_dim 24 (padded to 32 inside: the padding must not enter |q|, |k| or ln D), a group of 3 query heads
    # per KV head (padded tile rows) and a block_size that is not a power of two.
    rows = [(1, 30), (9, 9), (4, 45)]
    heads, head_dim = 6, 24
    batch = make_batch(torch.float32, rows=rows, heads=heads, kv_heads=2, head_dim=head_dim, block_size=12)
    gen = torch.Generator().manual_seed(3)
    sink = torch.randn(len(rows), heads, generator=gen).to(DEVICE)
    key_bias = torch.randn(len(rows), heads, 20, generator=gen).to(DEVICE)
    for mode in ("lssar", "reweight"):
        out, lse = kernels.paged_attention(**batch, scale=head_dim ** -0.5, sink_log_gain=sink, key_bias=key_bias,
                                           mode=mode, power=3.0)
        ref_out, ref_lse = reference_modes(**batch, scale=head_dim ** -0.5, mode=mode, power=3.0,
                                           sink_log_gain=sink, key_bias=key_bias)
        torch.testing.assert_close(out.cpu(), ref_out, atol=1e-5, rtol=0)
        torch.testing.assert_close(lse.cpu(), ref_lse, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["lssar", "reweight"])
def test_reweighting_does_not_overflow_at_large_positions(mode):
    # Keys 0 and 5 take nearly all the weight, so N a reaches ~N/2 ~ 500 and r = (N a - 1)^15 ~ 1e40 would overflow
    # fp32 (max 3.4e38) without the per-row scaling; their r ratio (0.9^15 ~ 0.2) keeps both in the output.
    rows = [(1, 1000), (2, 900), (1, 2)]
    batch = make_batch(torch.float32, rows=rows)
    sink = torch.full((len(rows), HQ), math.log(1e4), device=DEVICE)
    key_bias = torch.zeros(len(rows), HQ, 8, device=DEVICE)
    key_bias[:, :, 5] = math.log(0.9e4)
    out, lse = kernels.paged_attention(**batch, scale=SCALE, sink_log_gain=sink, key_bias=key_bias, mode=mode)
    ref_out, ref_lse = reference_modes(**batch, scale=SCALE, mode=mode, sink_log_gain=sink, key_bias=key_bias)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out.cpu(), ref_out, atol=ATOL[mode], rtol=0)
    torch.testing.assert_close(lse.cpu(), ref_lse, atol=1e-5, rtol=0)


def test_uniform_rows_reweight_to_zero_and_masked_rows_give_zero():
    # Identical keys: a = 1/N everywhere, so N a - 1 = 0 (up to rounding) and r / (sum r + 1e-8) = 0 for p >= 3;
    # below p = 3 the offset is 0 and the row stays uniform. All keys at -inf bias: out 0, lse -inf, no NaN.
    rows = [(1, 40), (6, 6)]
    batch = make_batch(torch.float32, rows=rows)
    batch["k_cache"][:] = batch["k_cache"][0, 0]
    for mode in ("lssar", "reweight"):
        out, _ = kernels.paged_attention(**batch, scale=SCALE, mode=mode)
        ref_out, _ = reference_modes(**batch, scale=SCALE, mode=mode)
        torch.testing.assert_close(out.cpu(), ref_out, atol=1e-5, rtol=0)
        assert (out[[0, 4, 5, 6]].abs() < 1e-6).all() and (out[1:4].abs() > 0).any()
    masked = make_batch(torch.float32, rows=[(3, 5)])
    key_bias = torch.full((1, HQ, 5), float("-inf"), device=DEVICE)
    for mode in ("lssa", "lssar", "reweight"):
        out, lse = kernels.paged_attention(**masked, scale=SCALE, key_bias=key_bias, mode=mode)
        assert (out == 0).all() and (lse == float("-inf")).all()


@pytest.mark.parametrize("mode", ["lssa", "lssar", "reweight"])
def test_modes_agree_with_the_cpu_path(mode):
    # A second opinion: kernels/cpu_attention.biased_attention (fp32 scores) on rows of equal query length.
    from steerserve.kernels.cpu_attention import biased_attention

    rows = [(3, 40), (3, 3), (3, 90)]
    batch = make_batch(torch.float32, rows=rows)
    gen = torch.Generator().manual_seed(5)
    bias = torch.randn(len(rows), HQ, 30, generator=gen)
    key_bias = bias.to(DEVICE)
    out, _ = kernels.paged_attention(**batch, scale=SCALE, key_bias=key_bias, mode=mode)
    block_table, k_cache, v_cache = batch["block_table"].cpu(), batch["k_cache"].cpu(), batch["v_cache"].cpu()
    keys = torch.arange(90)
    phys = block_table[:, keys // k_cache.shape[1]].long()  # [R, K] (past a row's end: never visible)
    k = k_cache[phys, keys % k_cache.shape[1]]  # [R, K, Hkv, D]
    v = v_cache[phys, keys % v_cache.shape[1]]
    seq_lens = batch["seq_lens"].cpu().long()
    q_pos = seq_lens[:, None] - 3 + torch.arange(3)
    cpu_out = biased_attention(batch["q"].cpu().view(len(rows), 3, HQ, -1), k.permute(0, 2, 3, 1),
                               v.permute(0, 2, 1, 3), q_pos, seq_lens, bias, SCALE, mode=mode)
    torch.testing.assert_close(out.cpu(), cpu_out.reshape(out.shape), atol=ATOL[mode], rtol=0)


def test_bad_mode_arguments_are_rejected():
    batch = make_batch(torch.float32, rows=[(1, 10)])
    with pytest.raises(ValueError, match="mode"):
        kernels.paged_attention(**batch, scale=SCALE, mode="relu")
    with pytest.raises(ValueError, match="num_kv_splits"):
        kernels.paged_attention(**batch, scale=SCALE, mode="lssa", num_kv_splits=2)
    with pytest.raises(ValueError, match="power"):
        kernels.paged_attention(**batch, scale=SCALE, mode="reweight", power=0.0)
