"""The CPU torch path of steered attention (kernels/cpu_attention.py) against plain per-row computations."""
from __future__ import annotations

import math

import pytest
import torch

from steerserve.kernels import cpu_attention as C

Hkv, G, D, BS = 2, 3, 16, 8


def paged(layout: str, n_blocks: int = 12, seed: int = 0):
    """A random logical cache [blocks, heads, slots, D] and its physical storage in `layout`."""
    g = torch.Generator().manual_seed(seed)
    logical = torch.randn(n_blocks, Hkv, BS, D, generator=g)
    if layout == "plain":
        return logical, logical.clone()
    stored = logical.transpose(2, 3).contiguous().view(n_blocks, Hkv, BS, D)  # [D, slots] inside each block
    return logical, stored


@pytest.mark.parametrize("layout", ["plain", "transposed"])
@pytest.mark.parametrize("table, n_max", [([[3], [7]], 5), ([[3, 1, 9], [0, 2, 4]], 19)])
def test_gathers_read_the_logical_keys_and_values(layout, table, n_max):
    logical, stored = paged(layout)
    blocks = torch.tensor(table)
    k_t = C.gather_keys_t(stored, blocks, layout, n_max)
    v = C.gather_values(stored, blocks, layout, n_max)
    for r, row in enumerate(table):
        keys = torch.cat([logical[b] for b in row], dim=1)  # [Hkv, slots, D]
        assert torch.equal(k_t[r, :, :, :n_max], keys[:, :n_max].transpose(1, 2))
        assert torch.equal(v[r, :, :n_max], keys[:, :n_max])


def test_block_layout_is_found_by_probing():
    def writer(transpose_k: bool, transpose_v: bool, scramble: bool = False):
        def write(k, v, kc, vc, slots):
            for cache, data, t in ((kc, k, transpose_k), (vc, v, transpose_v)):
                block = data[:, 0]  # [slots, D]
                block = block.T.contiguous().view(BS, D) if t else block
                cache[0, 0] = block.flip(0) if scramble else block
        return write

    assert C.block_layout(writer(True, False), BS, D, torch.float32) == ("transposed", "plain")
    assert C.block_layout(writer(False, True), BS, D, torch.bfloat16) == ("plain", "transposed")
    assert C.block_layout(writer(False, False, scramble=True), BS, D, torch.float16) == (None, None)


def naive(q, keys, values, pos, bias_row, scale, window=-1, softcap=0.0):
    """One query, one head, keys [K, D]: the textbook formula."""
    out = torch.zeros(D, dtype=torch.float64)
    weights = []
    for j in range(pos + 1):
        if window > 0 and j <= pos - window:
            weights.append(0.0)
            continue
        s = scale * float(q @ keys[j])
        if softcap:
            s = softcap * math.tanh(s / softcap)
        weights.append(math.exp(s + (float(bias_row[j]) if j < len(bias_row) else 0.0)))
    total = sum(weights)
    for j, w in enumerate(weights):
        out += w / total * values[j].double()
    return out


@pytest.mark.parametrize("window, softcap", [(-1, 0.0), (5, 0.0), (-1, 2.0)])
def test_biased_attention_matches_the_textbook(window, softcap):
    g = torch.Generator().manual_seed(1)
    R, T, K = 2, 4, 11
    q = torch.randn(R, T, Hkv * G, D, generator=g)
    keys, values = torch.randn(R, Hkv, K, D, generator=g), torch.randn(R, Hkv, K, D, generator=g)
    n_keys = torch.tensor([11, 7])
    q_pos = n_keys[:, None] - T + torch.arange(T)
    bias = torch.randn(R, Hkv * G, 6, generator=g) * 2
    bias[:, :, 0] = -30.0  # gamma -> 0 on the sink: no NaN, the sink is simply (almost) gone
    out = C.biased_attention(q, keys.transpose(2, 3), values, q_pos, n_keys, bias, 0.3, window, softcap)
    for r in range(R):
        for t in range(T):
            for h in range(Hkv * G):
                want = naive(q[r, t, h], keys[r, h // G], values[r, h // G], int(q_pos[r, t]), bias[r, h], 0.3,
                             window, softcap)
                assert torch.allclose(out[r, t, h].double(), want, atol=1e-5), (r, t, h)
