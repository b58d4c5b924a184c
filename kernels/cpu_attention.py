"""The CPU path of steered attention: exact softmax attention with additive per-(row, query head) key biases,
computed in torch for the steered rows of a batch, reading K/V from vLLM-CPU's paged cache.

vLLM-CPU's native kernel returns no log-sum-exp, and the post-hoc sink correction
`o' = (o + (g-1) a0 v0) / (1 + (g-1) a0)` cancels catastrophically when gamma < 1 on a head that puts nearly all
its weight on key 0 (a0 -> 1, the usual case for sink heads), so steered rows are recomputed here in fp32.
Unsteered rows never come here.
"""
from __future__ import annotations

import math

import torch

QUERY_CHUNK = 256  # prefill queries per score matrix, to bound memory at [heads, 256, keys]


def block_layout(write_block, block_size: int, head_size: int, dtype: torch.dtype) -> tuple[str | None, ...]:
    """How the backend's cache writer stores one block of one KV head, for keys and for values, found by
    writing known values: "plain" ([block_size, head_size] row-major), "transposed" ([head_size, block_size]),
    or None (anything else: the caller must not read such a cache). `write_block(key, value, key_cache,
    value_cache, slot_mapping)` is the backend's cache writer."""
    t, d = torch.meshgrid(torch.arange(block_size), torch.arange(head_size), indexing="ij")
    written = []
    for probe in (t, d):  # small integers: exact in every float dtype a cache may use
        data = probe[:, None, :].to(dtype).contiguous()
        caches = torch.zeros(1, 1, block_size, head_size, dtype=dtype), torch.zeros(1, 1, block_size, head_size,
                                                                                    dtype=dtype)
        write_block(data, data.clone(), *caches, torch.arange(block_size))
        written.append([c[0, 0].float().flatten() for c in caches])
    layouts = []
    for which in (0, 1):
        tok, chan = written[0][which], written[1][which]
        if torch.equal(tok, t.flatten().float()) and torch.equal(chan, d.flatten().float()):
            layouts.append("plain")
        elif torch.equal(tok, t.T.flatten().float()) and torch.equal(chan, d.T.flatten().float()):
            layouts.append("transposed")
        else:
            layouts.append(None)
    return tuple(layouts)


def gather_keys_t(key_cache: torch.Tensor, blocks: torch.Tensor, layout: str, n_max: int) -> torch.Tensor:
    """K transposed for a batch of rows: [rows, kv_heads, head_size, keys] with keys >= n_max (the most keys any
    row has), from a [num_blocks, kv_heads, block_size, head_size] cache view and a [rows, blocks] block table."""
    R, nb = blocks.shape
    _, Hkv, bs, D = key_cache.shape
    if layout == "transposed":
        cache = key_cache.view(-1, Hkv, D, bs)  # a view: never copy the whole cache
        if nb == 1:  # copy only the used slots of the one block (the common decode case)
            return cache[..., :n_max].index_select(0, blocks[:, 0])
        return cache[blocks.flatten()].view(R, nb, Hkv, D, bs).permute(0, 2, 3, 1, 4).reshape(R, Hkv, D, nb * bs)
    if nb == 1:
        return key_cache[:, :, :n_max].index_select(0, blocks[:, 0]).transpose(2, 3)
    return key_cache[blocks.flatten()].view(R, nb, Hkv, bs, D).permute(0, 2, 4, 1, 3).reshape(R, Hkv, D, nb * bs)


def gather_values(value_cache: torch.Tensor, blocks: torch.Tensor, layout: str, n_max: int) -> torch.Tensor:
    """V for a batch of rows: [rows, kv_heads, keys, head_size] with keys >= n_max."""
    R, nb = blocks.shape
    _, Hkv, bs, D = value_cache.shape
    if layout == "transposed":
        cache = value_cache.view(-1, Hkv, D, bs)
        if nb == 1:
            return cache[..., :n_max].index_select(0, blocks[:, 0]).transpose(2, 3)
        return cache[blocks.flatten()].view(R, nb, Hkv, D, bs).permute(0, 2, 1, 4, 3).reshape(R, Hkv, nb * bs, D)
    if nb == 1:
        return value_cache[:, :, :n_max].index_select(0, blocks[:, 0])
    return value_cache[blocks.flatten()].view(R, nb, Hkv, bs, D).permute(0, 2, 1, 3, 4).reshape(R, Hkv, nb * bs, D)


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
    Hkv = k_t.shape[1]
    K = min(k_t.shape[3], int(n_keys.max()))
    k_t, v = k_t[..., :K].float(), v[:, :, :K].float()
    G = Hq // Hkv
    W = min(bias.shape[2], K)
    keys = torch.arange(K)
    softplus = mode in ("lssa", "lssar")
    if softplus:
        k_t = torch.nn.functional.normalize(k_t, dim=2)
    chunks = []
    for lo in range(0, Tq, QUERY_CHUNK):
        T = min(Tq, lo + QUERY_CHUNK) - lo
        qc = q[:, lo:lo + T].float().view(R, T, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(R, Hkv, G * T, D)
        pos = q_pos[:, lo:lo + T, None]
        masked = keys > pos
        if sliding_window > 0:
            masked |= keys <= pos - sliding_window
        if softplus:
            s = torch.matmul(torch.nn.functional.normalize(qc, dim=-1), k_t).view(R, Hq, T, K)
            s *= (math.log(D) * torch.log(pos[:, None].float() + 1))
            a = torch.nn.functional.softplus(s)
            a[..., :W] *= bias[:, :, None, :W].exp()
            a.masked_fill_(masked[:, None], 0.0)
            a /= a.sum(-1, keepdim=True)
        else:
            s = torch.matmul(qc, k_t).mul_(scale).view(R, Hq, T, K)
            if softcap > 0:
                s = torch.tanh(s / softcap).mul_(softcap)
            s[..., :W] += bias[:, :, None, :W]
            s.masked_fill_(masked[:, None], float("-inf"))
            a = torch.softmax(s, dim=-1)
        if mode in ("lssar", "reweight"):  # in fp64: (N a)^15 overflows fp32 beyond N ~ 370
            n = pos[:, None].double() + 1
            r = torch.relu(n * a.double() - (n > 3).double()).pow_(power)
            a = (r / (r.sum(-1, keepdim=True) + 1e-8)).float()
        o = torch.matmul(a.view(R, Hkv, G * T, K), v).view(R, Hkv, G, T, D)
        chunks.append(o.permute(0, 3, 1, 2, 4).reshape(R, T, Hq, D))
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)
