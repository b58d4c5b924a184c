"""kernels/dispatch.py: which kernel runs, the cache views it hands the Triton kernel, and both kernels on the same
steered rows of a vLLM-CPU-layout cache against the independent float64 reference of test_attention_kernels.py.
Under a second with the interpreter."""
from __future__ import annotations

import math

import pytest
import torch

from steerserve.kernels import cpu_attention, dispatch
from tests.kernels.interpreter import load_kernels
from tests.kernels.test_attention_kernels import reference_attention

kernels = load_kernels()
HQ, HKV, D, BS = 4, 2, 32, 16


def test_the_kernel_follows_the_device_unless_overridden(monkeypatch):
    monkeypatch.delenv(dispatch.KERNEL_ENV, raising=False)
    assert dispatch.kernel_for(torch.device("cpu")) == "torch"
    assert dispatch.kernel_for(torch.device("cuda")) == "triton"
    monkeypatch.setenv(dispatch.KERNEL_ENV, "triton")
    assert dispatch.kernel_for(torch.device("cpu")) == "triton"
    monkeypatch.setenv(dispatch.KERNEL_ENV, "torch")
    assert dispatch.kernel_for(torch.device("cuda")) == "torch"
    monkeypatch.setenv(dispatch.KERNEL_ENV, "cuda")
    with pytest.raises(dispatch.UnsupportedAttention, match=dispatch.KERNEL_ENV):
        dispatch.kernel_for(torch.device("cpu"))


def _cpu_cache(kind: str, logical: torch.Tensor) -> torch.Tensor:
    """A vLLM-CPU style [num_blocks, Hkv, block_size, D] tile tensor holding `logical` [nb, bs, Hkv, D] in `kind`."""
    nb, bs, hkv, d = logical.shape
    tiles = logical.permute(0, 2, 1, 3).contiguous()  # plain: [bs, D] per tile
    if kind == "transposed":  # the same elements stored [D, bs] per tile, under the [bs, D] shape
        tiles = tiles.transpose(2, 3).contiguous().view(nb, hkv, bs, d)
    return tiles


@pytest.mark.parametrize("kind", ["plain", "transposed"])
def test_flash_views_of_cpu_tiles_are_the_logical_cache(kind):
    logical = torch.randn(5, BS, HKV, D)
    tiles = _cpu_cache(kind, logical)
    layout = cpu_attention.PLAIN if kind == "plain" else cpu_attention.TRANSPOSED
    key, value = dispatch.PagedKV(tiles, tiles, layout, layout).flash_views()
    assert torch.equal(key, logical) and torch.equal(value, logical)
    assert key.data_ptr() == tiles.data_ptr()  # a view: the cache is never copied


def test_triton_refuses_what_it_cannot_compute(monkeypatch):
    monkeypatch.setenv(dispatch.KERNEL_ENV, "triton")
    tiles = torch.zeros(2, HKV, BS, D)
    packed = cpu_attention.BlockLayout("packed", torch.arange(BS * D))
    args = (torch.zeros(1, 1, HQ, D), torch.zeros(1, 1, dtype=torch.int32), torch.tensor([[3]]), torch.tensor([4]),
            None, 1.0)
    with pytest.raises(dispatch.UnsupportedAttention, match="packed"):
        dispatch.steered_rows_attention(args[0], dispatch.PagedKV(tiles, tiles, packed, packed), *args[1:])
    with pytest.raises(dispatch.UnsupportedAttention, match="sliding window"):
        dispatch.steered_rows_attention(args[0], dispatch.PagedKV(tiles, tiles), *args[1:], sliding_window=8)
    with pytest.raises(dispatch.UnsupportedAttention, match="soft-capping"):
        dispatch.steered_rows_attention(args[0], dispatch.PagedKV(tiles, tiles), *args[1:], softcap=30.0)


@pytest.mark.parametrize("kernel", ["torch", "triton"])
@pytest.mark.parametrize("q_len, seq_lens", [(1, [37, 9, 50]), (12, [40])])  # decode rows; one prefill chunk
def test_both_kernels_match_the_reference_on_vllm_cpu_tiles(kernel, q_len, seq_lens, monkeypatch):
    monkeypatch.setenv(dispatch.KERNEL_ENV, kernel)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    gen = torch.Generator().manual_seed(q_len)
    R, nb = len(seq_lens), math.ceil(max(seq_lens) / BS)
    block_table = torch.randperm(R * nb + 2, generator=gen)[: R * nb].view(R, nb).int()
    k_logical, v_logical = torch.randn(2, R * nb + 2, BS, HKV, D, generator=gen)
    kv = dispatch.PagedKV(_cpu_cache("transposed", k_logical), _cpu_cache("plain", v_logical),
                          cpu_attention.TRANSPOSED, cpu_attention.PLAIN)
    q = torch.randn(R, q_len, HQ, D, generator=gen)
    n_keys = torch.tensor(seq_lens)
    q_pos = n_keys[:, None] - q_len + torch.arange(q_len)[None, :]
    bias = torch.randn(R, HQ, 20, generator=gen)
    out = dispatch.steered_rows_attention(q, kv, block_table, q_pos, n_keys, bias, 1 / math.sqrt(D))
    ref, _ = reference_attention(q.reshape(R * q_len, HQ, D), k_logical, v_logical, block_table,
                                 torch.arange(0, (R + 1) * q_len, q_len).int(), n_keys.int(), 1 / math.sqrt(D),
                                 key_bias=bias)
    torch.testing.assert_close(out.reshape(R * q_len, HQ, D).float(), ref, atol=1e-5, rtol=0)
