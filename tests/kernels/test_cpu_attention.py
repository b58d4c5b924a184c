"""The CPU torch path of steered attention (kernels/cpu_attention.py) against plain per-row computations."""
from __future__ import annotations

import math

import pytest
import torch

from steerserve.kernels import cpu_attention as C

Hkv, G, D, BS = 2, 3, 16, 8


# A packed layout as a kernel with channel-pair tiles might store it: [D / 2, slots, 2] inside each block.
PAIRS = torch.arange(BS * D).view(BS, D // 2, 2).permute(1, 0, 2).flatten()  # logical index at each storage slot


def paged(kind: str, n_blocks: int = 12, seed: int = 0):
    """A random logical cache [blocks, heads, slots, D], its physical storage in layout `kind`, and the layout."""
    g = torch.Generator().manual_seed(seed)
    logical = torch.randn(n_blocks, Hkv, BS, D, generator=g)
    if kind == "plain":
        return logical, logical.clone(), C.PLAIN
    if kind == "transposed":  # [D, slots] inside each block
        return logical, logical.transpose(2, 3).contiguous().view(n_blocks, Hkv, BS, D), C.TRANSPOSED
    stored = logical.flatten(2)[..., PAIRS].view(n_blocks, Hkv, BS, D)
    return logical, stored, C.BlockLayout("packed", torch.argsort(PAIRS))


@pytest.mark.parametrize("kind", ["plain", "transposed", "packed"])
@pytest.mark.parametrize("table, n_max", [([[3], [7]], 5), ([[3, 1, 9], [0, 2, 4]], 19)])
def test_gathers_read_the_logical_keys_and_values(kind, table, n_max):
    logical, stored, layout = paged(kind)
    blocks = torch.tensor(table)
    k_t = C.gather_keys_t(stored, blocks, layout, n_max)
    v = C.gather_values(stored, blocks, layout, n_max)
    for r, row in enumerate(table):
        keys = torch.cat([logical[b] for b in row], dim=1)  # [Hkv, slots, D]
        assert torch.equal(k_t[r, :, :, :n_max], keys[:, :n_max].transpose(1, 2))
        assert torch.equal(v[r, :, :n_max], keys[:, :n_max])


def test_block_layout_is_found_by_probing():
    def writer(transpose_k: bool, pack_v: bool, scramble: bool = False):
        def write(k, v, kc, vc, slots):
            kc[0, 0] = (k[:, 0].T.contiguous().view(BS, D) if transpose_k else k[:, 0])
            vc[0, 0] = v[:, 0].flatten()[PAIRS].view(BS, D) if pack_v else v[:, 0]
            if scramble:  # not a permutation of the block: two slots hold the same element
                kc[0, 0, 1] = kc[0, 0, 0]
        return write

    k, v = C.block_layout(writer(True, False), BS, D, torch.float32)
    assert (k.kind, v.kind) == ("transposed", "plain")
    k, v = C.block_layout(writer(False, True), BS, D, torch.bfloat16)
    assert (k.kind, v.kind) == ("plain", "packed") and torch.equal(v.source, torch.argsort(PAIRS))
    k, v = C.block_layout(writer(False, False, scramble=True), BS, D, torch.float16)
    assert k is None and v.kind == "plain"


def _isas() -> list[str]:
    """The cache writers vLLM-CPU has on x86 ("amx": bf16 tiles, picked on AMX machines; "vec", "vec16")."""
    return ["amx", "vec", "vec16"]


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size, head_size", [(32, 64), (128, 64), (128, 32), (32, 128)])
def test_every_vllm_cache_writer_is_read_back_exactly(isa, dtype, block_size, head_size):
    """vLLM-CPU's own cache writer stores random K/V for 3 sequences across scattered blocks; our probed layouts
    and gathers must give back exactly what was written, for every ISA's writer (forced, whatever this CPU has)."""
    from vllm import _custom_ops as ops

    def write(k, v, kc, vc, slots):
        ops.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")

    k_layout, v_layout = C.block_layout(write, block_size, head_size, dtype)
    assert k_layout is not None and v_layout is not None
    g = torch.Generator().manual_seed(3)
    n_blocks, kv_heads = 9, 2
    table = torch.tensor([[4, 0, 7], [8, 2, 5], [1, 6, 3]])
    lengths = [3 * block_size, 2 * block_size + 5, 1]
    kv = torch.zeros(n_blocks, kv_heads, block_size, 2 * head_size, dtype=dtype)  # vLLM-CPU's cache tensor
    key_cache, value_cache = kv.view(n_blocks, kv_heads, 2 * block_size, head_size).chunk(2, dim=2)
    written = []
    for row, n in enumerate(lengths):
        k = torch.randn(n, kv_heads, head_size, generator=g).to(dtype)
        v = torch.randn(n, kv_heads, head_size, generator=g).to(dtype)
        slots = table[row, torch.arange(n) // block_size] * block_size + torch.arange(n) % block_size
        write(k, v, key_cache, value_cache, slots)
        written.append((k, v))
    n_max = max(lengths)
    k_t = C.gather_keys_t(key_cache, table, k_layout, n_max)
    values = C.gather_values(value_cache, table, v_layout, n_max)
    for row, (k, v) in enumerate(written):
        n = len(k)
        assert torch.equal(k_t[row, :, :, :n], k.permute(1, 2, 0)), (isa, k_layout.kind)
        assert torch.equal(values[row, :, :n], v.transpose(0, 1)), (isa, v_layout.kind)
    # single-block rows take the decode fast path
    one = C.gather_keys_t(key_cache, table[:, :1], k_layout, 1)
    assert torch.equal(one[2, :, :, :1], written[2][0].permute(1, 2, 0))


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
