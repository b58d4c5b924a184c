"""Checks the steering attention kernels against an independent torch reference (Triton interpreter without a GPU).

Without CUDA the kernels run under TRITON_INTERPRET (fp32/fp16 only: bf16 tl.dot is garbage there, see
docs/internals.md), at small sizes: block_size 16, GQA Hq=4/Hkv=2, D=32 by default, a few other shapes once.
"""
from __future__ import annotations

import math

import pytest
import torch

from tests.kernels.interpreter import load_kernels

HQ, HKV, D, BLOCK_SIZE = 4, 2, 32, 16
SCALE = 1.0 / math.sqrt(D)
# (q_len, seq_len) per row: decode rows, a 1-token prompt, a whole prompt, prefill chunks crossing blocks.
ROWS = [(1, 37), (1, 1), (20, 20), (7, 50), (1, 100), (33, 70), (1, 17)]


kernels = load_kernels()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def reference_attention(q, k_cache, v_cache, block_table, query_start_loc, seq_lens, scale, *,
                        sink_log_gain=None, key_bias=None):
    """Explicit float64 scores + biases + causal mask + softmax, gathering K/V through the block table.

    Biases skip the query at absolute position 0 (it sees only key 0), as the kernels document.
    """
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.zeros(num_tokens, num_heads, head_dim, dtype=torch.float64, device=q.device)
    lse = torch.zeros(num_tokens, num_heads, dtype=torch.float64, device=q.device)
    qsl, lens = query_start_loc.tolist(), seq_lens.tolist()
    for r, seq_len in enumerate(lens):
        start, end = qsl[r], qsl[r + 1]
        if end == start:
            continue
        keys = torch.arange(seq_len, device=q.device)
        phys = block_table[r, keys // block_size].long()
        k = k_cache[phys, keys % block_size].double().repeat_interleave(group, dim=1)  # [n, Hq, D]
        v = v_cache[phys, keys % block_size].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("ihd,jhd->hij", q[start:end].double(), k) * scale  # [Hq, q_len, n]
        pos = seq_len - (end - start) + torch.arange(end - start, device=q.device)
        bias = torch.zeros_like(scores)
        if sink_log_gain is not None:
            bias[:, :, 0] += sink_log_gain[r].double()[:, None]
        if key_bias is not None:
            width = min(key_bias.shape[2], seq_len)
            bias[:, :, :width] += key_bias[r, :, None, :width].double()
        bias[:, pos == 0, :] = 0.0
        scores = (scores + bias).masked_fill(keys[None, None, :] > pos[None, :, None], float("-inf"))
        lse[start:end] = torch.logsumexp(scores, -1).T
        out[start:end] = torch.einsum("hij,jhd->ihd", torch.softmax(scores, -1), v)
    return out.to(q.dtype), lse.float()


def make_batch(dtype: torch.dtype, rows=ROWS, seed: int = 0, heads: int = HQ, kv_heads: int = HKV,
               head_dim: int = D, block_size: int = BLOCK_SIZE) -> dict:
    """Random q and a paged cache whose blocks are scattered (shuffled) over a larger pool."""
    gen = torch.Generator().manual_seed(seed)
    q_lens = [ql for ql, _ in rows]
    seq_lens = [sl for _, sl in rows]
    blocks_per_row = [math.ceil(sl / block_size) for sl in seq_lens]
    num_blocks = sum(blocks_per_row) + 5
    perm = torch.randperm(num_blocks, generator=gen)
    block_table = torch.zeros(len(rows), max(blocks_per_row), dtype=torch.int32)
    used = 0
    for r, n in enumerate(blocks_per_row):
        block_table[r, :n] = perm[used:used + n]
        used += n
    cache_shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(cache_shape, generator=gen)
    # A strong key 0, as in real models (the attention sink), so gains on it visibly move the output.
    k_cache[block_table[:, 0].long(), 0] *= 3.0
    batch = dict(
        q=torch.randn(sum(q_lens), heads, head_dim, generator=gen).to(dtype),
        k_cache=k_cache.to(dtype),
        v_cache=torch.randn(cache_shape, generator=gen).to(dtype),
        block_table=block_table,
        query_start_loc=torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
    )
    return {k: v.to(DEVICE) for k, v in batch.items()}


def make_biases(key_bias_len: int = 40, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row steering: rows 0 and 5 unbiased, 1/2/6 sink only, 3 key_bias only, 4 both."""
    gen = torch.Generator().manual_seed(seed)
    sink = torch.zeros(len(ROWS), HQ)
    sink[1] = math.log(3.0)                                  # 1-token prompt: must stay v0
    sink[2] = torch.tensor([math.log(4.0), math.log(0.25), 0.0, math.log(2.0)])
    sink[4] = math.log(0.5)
    sink[6] = torch.tensor([0.0, math.log(8.0), 0.0, -30.0])  # only some heads
    key_bias = torch.zeros(len(ROWS), HQ, key_bias_len)
    key_bias[3, :, :10] = math.log(0.9)                      # span steering: keys outside [10, 30)
    key_bias[3, :, 30:] = math.log(0.9)
    key_bias[4] = torch.randn(HQ, key_bias_len, generator=gen)
    return sink.to(DEVICE), key_bias.to(DEVICE)


def rows_tokens(rows: list[int]) -> torch.Tensor:
    qsl = [0, *torch.tensor([ql for ql, _ in ROWS]).cumsum(0).tolist()]
    return torch.tensor([t for r in rows for t in range(qsl[r], qsl[r + 1])])


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_mixed_batch_matches_reference(dtype, atol):
    batch = make_batch(dtype)
    sink, key_bias = make_biases()
    out, lse = kernels.paged_attention(**batch, scale=SCALE, sink_log_gain=sink, key_bias=key_bias)
    ref_out, ref_lse = reference_attention(**batch, scale=SCALE, sink_log_gain=sink, key_bias=key_bias)
    assert out.dtype == dtype and out.shape == batch["q"].shape
    assert lse.dtype == torch.float32 and lse.shape == batch["q"].shape[:2]
    torch.testing.assert_close(out.float(), ref_out.float(), atol=atol, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=atol, rtol=0)
    # The steering must actually change the steered rows (otherwise this test could not fail on a dropped bias).
    plain_out, _ = reference_attention(**batch, scale=SCALE)
    steered = rows_tokens([2, 3, 4])
    assert (ref_out[steered].float() - plain_out[steered].float()).abs().max() > 50 * atol


@pytest.mark.parametrize("heads, kv_heads, head_dim, block_size", [
    (3, 3, 24, 16),   # MHA, head_dim padded to 32
    (6, 2, 16, 12),   # group of 3 (query tile rows padded), block_size not a power of two
    (8, 1, 64, 32),   # MQA
])
def test_other_shapes_match_reference(heads, kv_heads, head_dim, block_size):
    rows = [(1, 30), (9, 9), (4, 45)]
    batch = make_batch(torch.float32, rows=rows, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                       block_size=block_size)
    gen = torch.Generator().manual_seed(3)
    sink = torch.randn(len(rows), heads, generator=gen).to(DEVICE)
    key_bias = torch.randn(len(rows), heads, 20, generator=gen).to(DEVICE)
    scale = head_dim ** -0.5
    out, lse = kernels.paged_attention(**batch, scale=scale, sink_log_gain=sink, key_bias=key_bias)
    ref_out, ref_lse = reference_attention(**batch, scale=scale, sink_log_gain=sink, key_bias=key_bias)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=0)


def test_one_token_prompt_is_v0_whatever_the_gain():
    batch = make_batch(torch.float32, rows=[(1, 1), (1, 1)])
    sink = torch.tensor([[float("-inf")] * HQ, [50.0] * HQ], device=DEVICE)
    out, lse = kernels.paged_attention(**batch, scale=SCALE, sink_log_gain=sink)
    v0 = batch["v_cache"][batch["block_table"][:, 0].long(), 0].repeat_interleave(HQ // HKV, dim=1)
    torch.testing.assert_close(out, v0, atol=1e-6, rtol=0)
    assert torch.isfinite(lse).all()


def test_unbiased_rows_are_bit_identical_to_the_unbiased_kernel():
    batch = make_batch(torch.float32)
    sink, key_bias = make_biases()
    plain_out, plain_lse = kernels.paged_attention(**batch, scale=SCALE)
    out, lse = kernels.paged_attention(**batch, scale=SCALE, sink_log_gain=sink, key_bias=key_bias)
    unbiased = rows_tokens([0, 5])
    assert torch.equal(out[unbiased], plain_out[unbiased])
    assert torch.equal(lse[unbiased], plain_lse[unbiased])
    # Also with zero-gain heads of a steered row (row 6, heads 0 and 2) and the sink-only variant.
    out, lse = kernels.paged_attention(**batch, scale=SCALE, sink_log_gain=sink)
    row6 = rows_tokens([6])
    assert torch.equal(out[row6][:, [0, 2]], plain_out[row6][:, [0, 2]])
    assert torch.equal(lse[rows_tokens([0, 3, 5])], plain_lse[rows_tokens([0, 3, 5])])


def test_key_splits_match_reference_and_keep_unbiased_rows_identical():
    # Flash-decoding path: 5 splits of 64 keys, so short rows leave whole splits empty (out 0, lse -inf).
    rows = [(1, 300), (1, 1), (5, 200), (1, 130), (1, 64)]
    batch = make_batch(torch.float32, rows=rows)
    sink = torch.zeros(len(rows), HQ, device=DEVICE)
    sink[[1, 2]] = math.log(4.0)
    key_bias = torch.zeros(len(rows), HQ, 150, device=DEVICE)
    key_bias[2, :, :100] = math.log(0.5)
    key_bias[3, :, 64:] = math.log(2.0)
    out, lse = kernels.paged_attention(**batch, scale=SCALE, sink_log_gain=sink, key_bias=key_bias,
                                       num_kv_splits=5)
    ref_out, ref_lse = reference_attention(**batch, scale=SCALE, sink_log_gain=sink, key_bias=key_bias)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=0)
    plain_out, plain_lse = kernels.paged_attention(**batch, scale=SCALE, num_kv_splits=5)
    unbiased = torch.tensor([0, 8])  # tokens of rows 0 and 4
    assert torch.equal(out[unbiased], plain_out[unbiased]) and torch.equal(lse[unbiased], plain_lse[unbiased])


@pytest.mark.parametrize("log_gain", [-30.0, -1e4, float("-inf")])
def test_gamma_to_zero_removes_the_sink_without_nan(log_gain):
    batch = make_batch(torch.float32)
    sink = torch.full((len(ROWS), HQ), log_gain, device=DEVICE)
    out, lse = kernels.paged_attention(**batch, scale=SCALE, sink_log_gain=sink)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    # Reference without the sink: key 0 masked out of every query but position 0 (which only sees key 0).
    no_sink = torch.zeros(len(ROWS), HQ, 1, device=DEVICE)
    no_sink[:] = float("-inf")
    ref_out, ref_lse = reference_attention(**batch, scale=SCALE, key_bias=no_sink)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=0)


def test_all_keys_at_minus_inf_gives_zero_not_nan():
    batch = make_batch(torch.float32, rows=[(3, 5)])
    key_bias = torch.full((1, HQ, 5), float("-inf"), device=DEVICE)
    out, lse = kernels.paged_attention(**batch, scale=SCALE, key_bias=key_bias)
    assert not out.isnan().any() and not lse.isnan().any()
    assert (out == 0).all() and (lse == float("-inf")).all()


# gamma = 0 only in fp32: the correction divides by 1 - a0, which amplifies fp16 rounding of `out` (documented).
@pytest.mark.parametrize("dtype, atol, row3_log_gain",
                         [(torch.float32, 2e-5, float("-inf")), (torch.float16, 3e-3, math.log(0.25))])
def test_sink_correction_matches_the_biased_kernel(dtype, atol, row3_log_gain):
    batch = make_batch(dtype)
    log_gain = torch.zeros(len(ROWS), HQ, device=DEVICE)
    log_gain[1] = math.log(3.0)                                       # position 0: untouched
    log_gain[2] = torch.tensor([math.log(4.0), math.log(0.25), 0.0, math.log(2.0)])
    log_gain[3] = row3_log_gain
    log_gain[4] = math.log(0.5)
    log_gain[6] = torch.tensor([0.0, math.log(8.0), 0.0, -30.0])
    plain_out, plain_lse = kernels.paged_attention(**batch, scale=SCALE)
    # FlashAttention hands lse as [Hq, T]; the kernel takes the transposed view without a copy.
    flash_lse = plain_lse.T.contiguous()
    corrected = kernels.sink_correction(plain_out.clone(), flash_lse.t(), batch["q"], batch["k_cache"],
                                        batch["v_cache"], batch["block_table"], batch["query_start_loc"],
                                        batch["seq_lens"], log_gain, SCALE)
    biased_out, _ = kernels.paged_attention(**batch, scale=SCALE, sink_log_gain=log_gain)
    ref_out, _ = reference_attention(**batch, scale=SCALE, sink_log_gain=log_gain)
    torch.testing.assert_close(corrected.float(), ref_out.float(), atol=atol, rtol=0)
    torch.testing.assert_close(corrected.float(), biased_out.float(), atol=atol, rtol=0)
    # Unsteered (row, head) pairs and position-0 queries are left bit-identical.
    untouched = torch.zeros_like(log_gain, dtype=torch.bool)
    untouched[[0, 1, 5]] = True
    untouched[2, 2] = untouched[6, 0] = untouched[6, 2] = True
    q_lens = batch["query_start_loc"].diff().long()
    mask = untouched.repeat_interleave(q_lens, dim=0)
    assert torch.equal(corrected[mask], plain_out[mask])
    assert not torch.equal(corrected[~mask], plain_out[~mask])


def test_bad_bias_shape_is_rejected():
    batch = make_batch(torch.float32)
    with pytest.raises(ValueError, match="sink_log_gain"):
        kernels.paged_attention(**batch, scale=SCALE, sink_log_gain=torch.zeros(len(ROWS), HQ + 1))
    with pytest.raises(ValueError, match="key_bias"):
        kernels.paged_attention(**batch, scale=SCALE, key_bias=torch.zeros(len(ROWS), HQ, 4).double())
