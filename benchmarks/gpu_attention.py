"""GPU check and benchmark of the steering attention kernels (`kernels/attention.py`): correctness, then cost.

(a) Correctness at real sizes (Hq=32, Hkv=8, D=128, block 16) in fp16 and bf16 against a torch fp32 reference:
    decode batches of 32 rows (contexts up to 512/2k/8k), one-row prefills and a mixed batch of prefill chunks
    plus decode rows; unsteered, steered (ZeroTuning sink gain + span key_bias), zero-bias rows bit-identical to
    the unbiased kernel, and `sink_correction` of the unbiased output against the sink-biased kernel.
(b) Timing (triton.testing.do_bench medians, CUDA events, L2 flushed): unsteered vs sink on every head vs
    key_bias vs both, and the `sink_correction` epilogue, for decode (1 and 32 rows) and prefill at several
    context lengths, with ratios to the unsteered kernel and torch SDPA as a yardstick.
(c) Attention modes (`paged_attention(mode=...)`: lssa, lssar, reweight; docs/methods/attention-modes.md), run first:
    correctness against a torch reference (fp32 scores, fp64 re-weighting) on steered decode, prefill and mixed
    batches (contexts up to 8k, so N a reaches thousands and x^15 would overflow fp32 unscaled), and timing of
    each mode vs the softmax kernel (same biases) for decode and prefill at a couple of context lengths.

(d) With `--engine MODEL` (needs steerserve installed with vLLM for CUDA): the experimental steering GPU backend
    inside vLLM (benchmarks/gpu_engine.py): which backend was built, whether steering moves the output, throughput.
(a)-(c) need only torch + triton (no vLLM, no install): run from the repo root on a CUDA machine as
    python -m benchmarks.gpu_attention --out DIR      or      python benchmarks/gpu_attention.py --out DIR
Writes DIR/gpu_attention.json (rewritten after every case, so a cut-off run keeps what it measured) and
DIR/gpu_attention.png. Cases start only within the time budget (`budget_s`), in the order (c), (a), (b). Every case catches its own failure into the JSON. `--dry-run` runs tiny sizes under
TRITON_INTERPRET on the CPU, to smoke-test this script without a GPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


@dataclass
class Sizes:
    heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    dtypes: tuple[str, ...]
    decode_rows: int                              # rows of the correctness decode batches
    check_contexts: tuple[int, ...]               # correctness contexts
    decode_batches: tuple[int, ...]               # rows of the timed decode batches
    decode_contexts: tuple[int, ...]
    prefills: tuple[tuple[int, int], ...]         # timed prefills: (rows, prompt length)
    budget_s: float                               # stop starting new cases after this
    mode_checks: tuple[tuple[str, str, int], ...] = ()   # (case kind, dtype, context) for the attention modes
    mode_timings: tuple[tuple[str, int, int], ...] = ()  # (decode | prefill, rows, context)
    atol: dict[str, float] = field(default_factory=dict)


# Each (mode, dtype, tile shape, bias set) compiles its own kernel (~10-30 s each), so the mode cases share a
# few variants: steered everywhere, fp16 for decode (BLOCK_M 16) and prefill/mixed (BLOCK_M 64), bf16 decode only.
# The 512-key cases of (a)/(b) were dropped to make room for (c) within ~5 minutes.
REAL = Sizes(heads=32, kv_heads=8, head_dim=128, block_size=16, dtypes=("float16", "bfloat16"), decode_rows=32,
             check_contexts=(2048, 8192), decode_batches=(1, 32), decode_contexts=(2048, 8192, 32768),
             prefills=((1, 2048), (1, 8192), (4, 2048)), budget_s=260.0,
             mode_checks=(("decode", "float16", 2048), ("decode", "float16", 8192), ("prefill", "float16", 4096),
                          ("mixed", "float16", 2048), ("decode", "bfloat16", 8192)),
             mode_timings=(("decode", 32, 2048), ("decode", 32, 8192), ("decode", 1, 8192), ("prefill", 1, 2048),
                           ("prefill", 1, 8192)),
             atol={"float16": 1e-2, "bfloat16": 5e-2, "float32": 1e-4})
# The interpreter is exact for fp32/fp16 but computes bf16 tl.dot wrongly, so the dry run skips bf16.
DRY = Sizes(heads=4, kv_heads=2, head_dim=32, block_size=16, dtypes=("float16", "float32"), decode_rows=6,
            check_contexts=(40,), decode_batches=(2,), decode_contexts=(40,), prefills=((1, 24),), budget_s=120.0,
            mode_checks=(("decode", "float32", 40), ("mixed", "float16", 40)),
            mode_timings=(("decode", 2, 40), ("prefill", 1, 24)),
            atol={"float16": 3e-3, "float32": 1e-4})
MODES = ("lssa", "lssar", "reweight")
POWER = 15.0
LSE_ATOL = 1e-3  # lse comes from fp32 scores of exact low-precision inputs, so it stays tight in every dtype


def import_kernels():
    """steerserve.kernels.attention if installed, else the repo's kernels/ (the GPU machine has no install)."""
    try:
        from steerserve.kernels import attention
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from kernels import attention
    return attention


# ----------------------------------------------------------------------------------------------------------------
# Batches, biases and the reference


def make_batch(sz: Sizes, rows: list[tuple[int, int]], dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    """(q_len, seq_len) per row -> q and a paged cache with every row's blocks scattered over the pool."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    blocks = [math.ceil(seq_len / sz.block_size) for _, seq_len in rows]
    num_blocks = sum(blocks) + 8
    perm = torch.randperm(num_blocks, generator=gen)
    block_table = torch.zeros(len(rows), max(blocks), dtype=torch.int32)
    used = 0
    for r, n in enumerate(blocks):
        block_table[r, :n] = perm[used:used + n]
        used += n
    shape = (num_blocks, sz.block_size, sz.kv_heads, sz.head_dim)
    q_lens = torch.tensor([q_len for q_len, _ in rows])
    k_cache = torch.randn(shape, device=device, dtype=dtype)
    k_cache[block_table[:, 0].long().to(device), 0] *= 3.0  # a strong key 0, like a real attention sink
    return dict(
        q=torch.randn(int(q_lens.sum()), sz.heads, sz.head_dim, device=device, dtype=dtype),
        k_cache=k_cache,
        v_cache=torch.randn(shape, device=device, dtype=dtype),
        block_table=block_table.to(device),
        query_start_loc=torch.cat([torch.zeros(1, dtype=torch.long), q_lens.cumsum(0)]).int().to(device),
        seq_lens=torch.tensor([s for _, s in rows], dtype=torch.int32, device=device),
    )


def make_biases(sz: Sizes, rows: list[tuple[int, int]], device: str, steered_every: int = 1, seed: int = 1):
    """sink_log_gain in ln[0.25, 4] per (row, head) and a span key_bias (ln 0.9 outside a random span of the
    prompt) on every `steered_every`-th row; the other rows get zeros (to check they stay bit-identical).
    The prompt of a decode row is its context before this step; a prefill (chunk) row is all prompt."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    num_rows = len(rows)
    prompts = [max(seq_len - 1, 1) if q_len == 1 else seq_len for q_len, seq_len in rows]
    sink = (torch.rand(num_rows, sz.heads, generator=gen) * 2 - 1) * math.log(4.0)
    key_bias = torch.zeros(num_rows, sz.heads, max(prompts))
    for r, prompt in enumerate(prompts):
        lo = int(torch.randint(0, prompt, (1,), generator=gen))
        hi = int(torch.randint(lo, prompt + 1, (1,), generator=gen))
        key_bias[r, :, :prompt] = math.log(0.9)
        key_bias[r, :, lo:hi] = 0.0
    unsteered = torch.arange(num_rows) % steered_every != 0
    sink[unsteered] = 0.0
    key_bias[unsteered] = 0.0
    return sink.to(device), key_bias.to(device), unsteered


def reference_attention(q, k_cache, v_cache, block_table, query_start_loc, seq_lens, scale, *,
                        sink_log_gain=None, key_bias=None):
    """fp32 torch: gather K/V through the block table, scores + biases + causal mask, softmax (no TF32)."""
    num_tokens, num_heads, head_dim = q.shape
    block_size, group = k_cache.shape[1], num_heads // k_cache.shape[2]
    out = torch.zeros(num_tokens, num_heads, head_dim, device=q.device)
    lse = torch.zeros(num_tokens, num_heads, device=q.device)
    qsl, lens = query_start_loc.tolist(), seq_lens.tolist()
    for r, seq_len in enumerate(lens):
        start, end = qsl[r], qsl[r + 1]
        keys = torch.arange(seq_len, device=q.device)
        phys = block_table[r, keys // block_size].long()
        k = k_cache[phys, keys % block_size].float().repeat_interleave(group, 1).transpose(0, 1)  # [H, n, D]
        v = v_cache[phys, keys % block_size].float().repeat_interleave(group, 1).transpose(0, 1)
        scores = q[start:end].float().transpose(0, 1) @ k.transpose(1, 2) * scale  # [H, q_len, n]
        pos = seq_len - (end - start) + torch.arange(end - start, device=q.device)
        bias = torch.zeros(num_heads, 1, seq_len, device=q.device)
        if sink_log_gain is not None:
            bias[:, 0, 0] += sink_log_gain[r]
        if key_bias is not None:
            width = min(key_bias.shape[2], seq_len)
            bias[:, 0, :width] += key_bias[r, :, :width]
        scores = scores + bias * (pos > 0)[None, :, None]  # the query at position 0 is never biased
        scores = scores.masked_fill(keys[None, None, :] > pos[None, :, None], float("-inf"))
        lse[start:end] = torch.logsumexp(scores, -1).T
        out[start:end] = (torch.softmax(scores, -1) @ v).transpose(0, 1)
    return out, lse


# ----------------------------------------------------------------------------------------------------------------
# (a) correctness


def check_case(attn, sz: Sizes, name: str, rows, dtype_name: str, device: str) -> dict:
    dtype = getattr(torch, dtype_name)
    batch = make_batch(sz, rows, dtype, device)
    scale = sz.head_dim ** -0.5
    sink, key_bias, unsteered = make_biases(sz, rows, device, steered_every=2)
    atol = sz.atol[dtype_name]
    res: dict = {"case": name, "dtype": dtype_name, "rows": len(rows), "tokens": batch["q"].shape[0],
                 "max_seq_len": max(s for _, s in rows), "atol_out": atol, "atol_lse": LSE_ATOL}

    def errors(got, ref):
        return {"out": (got[0].float() - ref[0]).abs().max().item(), "lse": (got[1] - ref[1]).abs().max().item()}

    plain = attn.paged_attention(**batch, scale=scale)
    plain_ref = reference_attention(**batch, scale=scale)
    res["unsteered"] = errors(plain, plain_ref)
    steered = attn.paged_attention(**batch, scale=scale, sink_log_gain=sink, key_bias=key_bias)
    ref_steered = reference_attention(**batch, scale=scale, sink_log_gain=sink, key_bias=key_bias)
    res["steered"] = errors(steered, ref_steered)
    res["steering_effect"] = (ref_steered[0] - plain_ref[0]).abs().max().item()  # shows the check can fail
    del plain_ref, ref_steered

    tok_rows = torch.repeat_interleave(torch.arange(len(rows)), batch["query_start_loc"].diff().long().cpu())
    same = unsteered[tok_rows].to(device)
    res["unsteered_rows_bit_identical"] = bool(torch.equal(steered[0][same], plain[0][same])
                                               and torch.equal(steered[1][same], plain[1][same]))

    sink_only = attn.paged_attention(**batch, scale=scale, sink_log_gain=sink)
    flash_lse = plain[1].T.contiguous()  # FlashAttention's [Hq, T] layout
    corrected = attn.sink_correction(plain[0].clone(), flash_lse.t(), batch["q"], batch["k_cache"],
                                     batch["v_cache"], batch["block_table"], batch["query_start_loc"],
                                     batch["seq_lens"], sink, scale)
    res["sink_correction_vs_biased"] = (corrected.float() - sink_only[0].float()).abs().max().item()
    res["sink_correction_vs_reference"] = (
        corrected.float() - reference_attention(**batch, scale=scale, sink_log_gain=sink)[0]).abs().max().item()
    res["nan"] = bool(any(t.isnan().any() for t in (*plain, *steered, corrected)))
    res["ok"] = (not res["nan"] and res["unsteered_rows_bit_identical"]
                 and max(res["unsteered"]["out"], res["steered"]["out"], res["sink_correction_vs_reference"])
                 <= atol and max(res["unsteered"]["lse"], res["steered"]["lse"]) <= LSE_ATOL)
    return res


def check_cases(sz: Sizes) -> list[tuple[str, list[tuple[int, int]]]]:
    gen = torch.Generator().manual_seed(2)
    cases = []
    for ctx in sz.check_contexts:
        lens = torch.randint(ctx // 2, ctx + 1, (sz.decode_rows,), generator=gen).tolist()
        cases.append((f"decode-{ctx}", [(1, n) for n in lens]))
        cases.append((f"decode-2rows-{ctx}", [(1, ctx), (1, ctx // 3)]))  # few rows: the key-split path
        q_len = min(ctx, 1024)  # a last chunk of 1024 keeps the fp32 reference's scores small at 8k
        cases.append((f"prefill-{ctx}", [(q_len, ctx)]))
    ctx = max(sz.check_contexts)
    chunks = [(min(ctx // 8, 512), ctx // 2), (min(ctx // 4, 256), ctx), (1, 1), (ctx // 16 + 1, ctx // 16 + 1)]
    cases.append(("mixed", chunks + [(1, n) for n in torch.randint(2, ctx, (sz.decode_rows - 4,),
                                                                     generator=gen).tolist()]))
    return cases


# ----------------------------------------------------------------------------------------------------------------
# (b) timing


def bench(fn, device: str) -> float:
    """Median milliseconds per call."""
    if device == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def time_case(attn, sz: Sizes, mode: str, num_rows: int, ctx: int, dtype_name: str, device: str) -> dict:
    dtype = getattr(torch, dtype_name)
    rows = [(1, ctx)] * num_rows if mode == "decode" else [(ctx, ctx)] * num_rows
    batch = make_batch(sz, rows, dtype, device)
    scale = sz.head_dim ** -0.5
    sink, key_bias, _ = make_biases(sz, rows, device)  # every row and head steered
    out, lse = attn.paged_attention(**batch, scale=scale)
    lse_t = lse.T.contiguous().t()  # FlashAttention's [Hq, T] layout, as a backend would pass it
    spare = out.clone()
    ms = {
        "unsteered": bench(lambda: attn.paged_attention(**batch, scale=scale, out=out, lse=lse), device),
        "sink": bench(lambda: attn.paged_attention(**batch, scale=scale, sink_log_gain=sink, out=out, lse=lse),
                      device),
        "key_bias": bench(lambda: attn.paged_attention(**batch, scale=scale, key_bias=key_bias, out=out,
                                                       lse=lse), device),
        "sink+key_bias": bench(lambda: attn.paged_attention(**batch, scale=scale, sink_log_gain=sink,
                                                            key_bias=key_bias, out=out, lse=lse), device),
        # Applied repeatedly to the same buffer: the values drift, the work does not.
        "sink_correction_only": bench(lambda: attn.sink_correction(
            spare, lse_t, batch["q"], batch["k_cache"], batch["v_cache"], batch["block_table"],
            batch["query_start_loc"], batch["seq_lens"], sink, scale), device),
    }
    ms["unsteered+sink_correction"] = ms["unsteered"] + ms["sink_correction_only"]
    if device == "cuda":
        try:
            ms["torch_sdpa"] = bench(sdpa_yardstick(sz, mode, num_rows, ctx, dtype, device), device)
        except Exception as exc:  # older torch without enable_gqa, or no fused kernel for the shape
            ms["torch_sdpa_error"] = repr(exc)
    tokens = batch["q"].shape[0]
    kv_bytes = 2 * num_rows * ctx * sz.kv_heads * sz.head_dim * batch["k_cache"].element_size()
    flops = 4 * num_rows * sz.heads * sz.head_dim * (ctx if mode == "decode" else ctx * (ctx + 1) / 2)
    base = ms["unsteered"]
    splits = attn._auto_kv_splits(batch["q"], tokens, num_rows, sz.kv_heads, ctx)
    return {"mode": mode, "dtype": dtype_name, "rows": num_rows, "context": ctx, "tokens": tokens, "ms": ms,
            "kv_splits": splits,
            "ratio_to_unsteered": {k: v / base for k, v in ms.items() if isinstance(v, float)},
            "unsteered_GBps": kv_bytes / base / 1e6, "unsteered_TFLOPs": flops / base / 1e9}


def sdpa_yardstick(sz: Sizes, mode: str, num_rows: int, ctx: int, dtype, device: str):
    """torch SDPA on contiguous K/V of the same shape (no paging, no steering): a speed reference."""
    q_len = 1 if mode == "decode" else ctx
    q = torch.randn(num_rows, sz.heads, q_len, sz.head_dim, device=device, dtype=dtype)
    k = torch.randn(num_rows, sz.kv_heads, ctx, sz.head_dim, device=device, dtype=dtype)
    v = torch.randn_like(k)
    causal = mode != "decode"
    return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)


# ----------------------------------------------------------------------------------------------------------------
# (c) attention modes


def reference_modes(q, k_cache, v_cache, block_table, query_start_loc, seq_lens, scale, *, mode, power=POWER,
                    sink_log_gain=None, key_bias=None):
    """torch per row: scores and a in fp32 (no TF32), the re-weighting in fp64 (x^15 overflows fp32), as in
    paged_attention's docstring: lssa a = phi / sum phi, phi = softplus(ln(D) ln(p+1) q^.k^) e^b; reweight /
    lssar: a' = r / (sum r + 1e-8), r = relu((p+1) a - [p >= 3])^power. lse: ln sum phi (lssa, lssar) or the
    softmax log-sum-exp (reweight)."""
    num_tokens, num_heads, head_dim = q.shape
    block_size, group = k_cache.shape[1], num_heads // k_cache.shape[2]
    out = torch.zeros(num_tokens, num_heads, head_dim, device=q.device)
    lse = torch.zeros(num_tokens, num_heads, device=q.device)
    qsl, lens = query_start_loc.tolist(), seq_lens.tolist()
    for r, seq_len in enumerate(lens):
        start, end = qsl[r], qsl[r + 1]
        keys = torch.arange(seq_len, device=q.device)
        phys = block_table[r, keys // block_size].long()
        k = k_cache[phys, keys % block_size].float().repeat_interleave(group, 1).transpose(0, 1)  # [H, n, D]
        v = v_cache[phys, keys % block_size].float().repeat_interleave(group, 1).transpose(0, 1)
        qr = q[start:end].float().transpose(0, 1)  # [H, q_len, D]
        pos = seq_len - (end - start) + torch.arange(end - start, device=q.device)
        bias = torch.zeros(num_heads, 1, seq_len, device=q.device)
        if sink_log_gain is not None:
            bias[:, 0, 0] += sink_log_gain[r]
        if key_bias is not None:
            width = min(key_bias.shape[2], seq_len)
            bias[:, 0, :width] += key_bias[r, :, :width]
        bias = bias * (pos > 0)[None, :, None]  # the query at position 0 is never biased
        hidden = keys[None, None, :] > pos[None, :, None]
        if mode in ("lssa", "lssar"):
            cos = (torch.nn.functional.normalize(qr, dim=-1)
                   @ torch.nn.functional.normalize(k, dim=-1).transpose(1, 2))
            phi = torch.nn.functional.softplus(math.log(head_dim) * torch.log(pos + 1.0)[None, :, None] * cos)
            phi = (phi * bias.exp()).masked_fill(hidden, 0.0)
            z = phi.sum(-1, keepdim=True)
            lse[start:end] = z[..., 0].log().T
            a = phi / z
            del cos, phi
        else:
            scores = (qr @ k.transpose(1, 2) * scale + bias).masked_fill(hidden, float("-inf"))
            lse[start:end] = torch.logsumexp(scores, -1).T
            a = torch.softmax(scores, -1)
            del scores
        if mode in ("lssar", "reweight"):
            n = (pos + 1.0).double()[None, :, None]
            rw = torch.relu(n * a.double() - (pos >= 3).double()[None, :, None]).pow_(power)
            a = (rw / (rw.sum(-1, keepdim=True) + 1e-8)).float()
            del rw
        out[start:end] = (a @ v).transpose(0, 1)
    return out, lse


def mode_rows(sz: Sizes, kind: str, ctx: int) -> list[tuple[int, int]]:
    gen = torch.Generator().manual_seed(4)
    if kind == "decode":
        return [(1, n) for n in torch.randint(ctx // 2, ctx + 1, (sz.decode_rows,), generator=gen).tolist()]
    if kind == "prefill":  # the last chunk of a long prompt: absolute positions ctx - q_len .. ctx - 1
        return [(min(ctx, 1024), ctx)]
    # mixed: prefill chunks (one starting mid-prompt), a 1-token prompt, a whole short prompt, decode rows
    chunks = [(min(ctx // 8, 256), ctx // 2), (min(ctx // 4, 128), ctx), (1, 1), (min(ctx // 16 + 1, 64),) * 2]
    return chunks + [(1, n) for n in torch.randint(2, ctx, (sz.decode_rows - 4,), generator=gen).tolist()]


def mode_check_case(attn, sz: Sizes, kind: str, dtype_name: str, ctx: int, device: str) -> dict:
    dtype = getattr(torch, dtype_name)
    rows = mode_rows(sz, kind, ctx)
    batch = make_batch(sz, rows, dtype, device, seed=3)
    scale = sz.head_dim ** -0.5
    sink, key_bias, _ = make_biases(sz, rows, device, steered_every=2)
    atol = sz.atol[dtype_name]
    res: dict = {"case": f"{kind}-{ctx}", "dtype": dtype_name, "rows": len(rows), "tokens": batch["q"].shape[0],
                 "max_seq_len": max(s for _, s in rows), "power": POWER, "atol_out": atol, "atol_lse": LSE_ATOL,
                 "modes": {}}
    soft_ref = reference_modes(**batch, scale=scale, mode="softmax", sink_log_gain=sink, key_bias=key_bias)[0]
    for mode in MODES:
        out, lse = attn.paged_attention(**batch, scale=scale, sink_log_gain=sink, key_bias=key_bias, mode=mode,
                                        power=POWER)
        ref_out, ref_lse = reference_modes(**batch, scale=scale, mode=mode, sink_log_gain=sink, key_bias=key_bias)
        finite = bool(torch.isfinite(out).all() and torch.isfinite(lse).all())
        res["modes"][mode] = {
            "out": (out.float() - ref_out).abs().max().item(), "lse": (lse - ref_lse).abs().max().item(),
            "finite": finite, "vs_softmax": (ref_out - soft_ref).abs().max().item(),  # shows the check can fail
        }
        del out, lse, ref_out, ref_lse
    res["ok"] = all(m["finite"] and m["out"] <= atol and m["lse"] <= LSE_ATOL for m in res["modes"].values())
    return res


def mode_time_case(attn, sz: Sizes, kind: str, num_rows: int, ctx: int, device: str) -> dict:
    """Every mode vs softmax with the same biases (sink + key_bias on every row), fp16. softmax may split the keys
    of a small decode batch (flash-decoding); the other modes never do, so softmax_1split is shown too."""
    rows = [(1, ctx)] * num_rows if kind == "decode" else [(ctx, ctx)] * num_rows
    batch = make_batch(sz, rows, torch.float16, device)
    scale = sz.head_dim ** -0.5
    sink, key_bias, _ = make_biases(sz, rows, device)
    out, lse = attn.paged_attention(**batch, scale=scale)

    def call(mode, **kw):
        return lambda: attn.paged_attention(**batch, scale=scale, sink_log_gain=sink, key_bias=key_bias, out=out,
                                            lse=lse, mode=mode, power=POWER, **kw)

    ms = {"softmax": bench(call("softmax"), device)}
    splits = attn._auto_kv_splits(batch["q"], batch["q"].shape[0], num_rows, sz.kv_heads, ctx)
    if splits > 1:
        ms["softmax_1split"] = bench(call("softmax", num_kv_splits=1), device)
    for mode in MODES:
        ms[mode] = bench(call(mode), device)
    return {"kind": kind, "dtype": "float16", "rows": num_rows, "context": ctx, "tokens": batch["q"].shape[0],
            "softmax_kv_splits": splits, "ms": ms, "ratio_to_softmax": {k: v / ms["softmax"] for k, v in ms.items()}}


# ----------------------------------------------------------------------------------------------------------------


def plot(report: dict, path: Path) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed"
    groups: dict[tuple, list[dict]] = {}
    for t in report["timing"]:
        if "ms" in t:
            groups.setdefault((t["dtype"], t["mode"], t["rows"]), []).append(t)
    if not groups:
        return "no timings"
    dtypes = sorted({k[0] for k in groups})
    shapes = sorted({k[1:] for k in groups})
    fig, axes = plt.subplots(len(dtypes), len(shapes), figsize=(4.2 * len(shapes), 3.6 * len(dtypes)),
                             squeeze=False)
    for i, dtype in enumerate(dtypes):
        for j, (mode, rows) in enumerate(shapes):
            ax = axes[i][j]
            cases = sorted(groups.get((dtype, mode, rows), []), key=lambda t: t["context"])
            ctxs = [t["context"] for t in cases]
            for variant in ("sink", "key_bias", "sink+key_bias", "unsteered+sink_correction", "torch_sdpa"):
                ys = [t["ratio_to_unsteered"].get(variant, float("nan")) for t in cases]
                ax.plot(ctxs, ys, marker="o", label=variant)
            for t in cases:  # the unsteered kernel's own time, for scale
                ax.annotate(f"{t['ms']['unsteered']:.3g} ms", (t["context"], 1.0), fontsize=6,
                            textcoords="offset points", xytext=(0, -10), ha="center")
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{mode}, {rows} row(s), {dtype}", fontsize=9)
            ax.set_xlabel("context (keys)")
            ax.set_ylabel("time / unsteered kernel")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"steering attention kernels on {report['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes under TRITON_INTERPRET on the CPU")
    parser.add_argument("--engine", metavar="MODEL", help="also (d): the steering GPU backend inside vLLM on MODEL "
                        "(benchmarks/gpu_engine.py; needs steerserve installed with vLLM for CUDA)")
    parser.add_argument("--engine-dtype", default="bfloat16", help="(d)'s dtype: bfloat16/float16 get FLASH_ATTN, "
                        "float32 TRITON_ATTN")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: it decides at @triton.jit time
    elif not torch.cuda.is_available():
        print("no CUDA device: use --dry-run for a CPU smoke test", file=sys.stderr)
        return 2
    import triton
    attn = import_kernels()
    sz, device = (DRY, "cpu") if args.dry_run else (REAL, "cuda")
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the reference must be real fp32
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.out / "gpu_attention.json", args.out / "gpu_attention.png"
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else f"CPU interpreter ({platform.node()})",
              "capability": list(torch.cuda.get_device_capability()) if device == "cuda" else None,
              "torch": torch.__version__, "triton": triton.__version__, "dry_run": args.dry_run,
              "sizes": asdict(sz), "mode_correctness": [], "mode_timing": [], "correctness": [], "timing": [],
              "skipped": []}
    started = time.monotonic()

    def save():
        report["elapsed_s"] = round(time.monotonic() - started, 1)
        json_path.write_text(json.dumps(report, indent=1))

    def run(kind: str, label: str, fn):
        if time.monotonic() - started > sz.budget_s:
            report["skipped"].append(f"{kind} {label}: time budget")
            return
        t0 = time.monotonic()
        try:
            res = fn()
        except Exception as exc:
            res = {"case": label, "error": repr(exc), "traceback": traceback.format_exc(limit=4)}
        res["wall_s"] = round(time.monotonic() - t0, 2)
        report[kind].append(res)
        if "error" in res:
            brief = res["error"]
        elif kind == "correctness":
            brief = f"ok={res['ok']} out_err={res['steered']['out']:.2e}"
        elif kind == "mode_correctness":
            brief = f"ok={res['ok']} " + " ".join(f"{m}_err={e['out']:.2e}" for m, e in res["modes"].items())
        else:
            ratios = res["ratio_to_softmax" if kind == "mode_timing" else "ratio_to_unsteered"]
            brief = " ".join(f"{k}={v:.3f}" for k, v in ratios.items())
        print(f"[{time.monotonic() - started:6.1f}s] {kind} {label}: {brief}", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
        save()

    for kind, dtype_name, ctx in sz.mode_checks:
        run("mode_correctness", f"{kind}-{ctx} {dtype_name}",
            lambda k=kind, d=dtype_name, c=ctx: mode_check_case(attn, sz, k, d, c, device))
    for kind, num_rows, ctx in sz.mode_timings:
        run("mode_timing", f"{kind} rows={num_rows} ctx={ctx} float16",
            lambda k=kind, n=num_rows, c=ctx: mode_time_case(attn, sz, k, n, c, device))
    for dtype_name in sz.dtypes:
        for name, rows in check_cases(sz):
            run("correctness", f"{name} {dtype_name}",
                lambda rows=rows, name=name, d=dtype_name: check_case(attn, sz, name, rows, d, device))
    for dtype_name in sz.dtypes:
        for num_rows in sz.decode_batches:
            for ctx in sz.decode_contexts:
                run("timing", f"decode rows={num_rows} ctx={ctx} {dtype_name}",
                    lambda n=num_rows, c=ctx, d=dtype_name: time_case(attn, sz, "decode", n, c, d, device))
        for num_rows, ctx in sz.prefills:
            run("timing", f"prefill rows={num_rows} ctx={ctx} {dtype_name}",
                lambda n=num_rows, c=ctx, d=dtype_name: time_case(attn, sz, "prefill", n, c, d, device))
    if args.engine:  # last: it loads a model next to the kernels' cases
        from benchmarks.gpu_engine import engine_case

        def engine():
            res = engine_case(args.engine, args.engine_dtype)
            res["ratio_to_unsteered"] = {f"{t['steered_fraction']:.0%} K={t['distinct_configs']}": t["ratio"]
                                         for t in res["throughput"]}
            return res

        report["engine"] = []
        sz.budget_s = float("inf")  # (d) runs whatever the kernel cases took
        run("engine", f"steering backend in vLLM ({args.engine}, {args.engine_dtype})", engine)
    report["all_correct"] = all(c.get("ok", False) for c in report["correctness"] + report["mode_correctness"])
    report["plot_error"] = plot(report, png_path)
    save()
    print(f"wrote {json_path}" + ("" if report["plot_error"] else f" and {png_path}"))
    print(f"all correctness checks passed: {report['all_correct']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
