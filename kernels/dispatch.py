"""One entry point for the exact attention of steered rows: the torch path (kernels/cpu_attention.py) or the Triton
kernel (kernels/attention.py), chosen by the device the tensors live on.

Both attention backends call `steered_rows_attention` the same way: the CPU one (server/engine/attention_backend.py)
with vLLM-CPU's cache, the GPU one (server/engine/attention_backend_gpu.py) with the cache of vLLM's GPU backends.
`PagedKV` describes either cache as per-(block, KV head) tiles, which both paths read:

- vLLM-CPU: key/value [num_blocks, Hkv, block_size, D] tiles stored plain, transposed ([D, block_size]) or packed
  (the AMX kernel's channel-pair tiles), as `cpu_attention.block_layout` finds by probing the cache writer.
- vLLM GPU (FlashAttention, Triton backend): key/value [num_blocks, block_size, Hkv, D] views (`PagedKV.flash`).

The kernel: `STEERSERVE_ATTENTION_KERNEL` = `auto` (default: Triton on CUDA tensors, torch elsewhere), `torch` or
`triton`. Read at every call, so tests can flip it on a running engine; `triton` on CPU tensors needs
`TRITON_INTERPRET=1` set before the kernels module is first imported (tests/kernels/interpreter.py). The Triton path
has no sliding window, logit soft-capping or packed (AMX) tiles: it raises `UnsupportedAttention` for them, and the
backend then switches attention steering off with the reason (it never falls back silently to another formula).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from . import cpu_attention
from .cpu_attention import PLAIN, BlockLayout

KERNEL_ENV = "STEERSERVE_ATTENTION_KERNEL"
KERNELS = ("auto", "torch", "triton")


class UnsupportedAttention(ValueError):
    """The chosen kernel cannot compute this attention (a feature it lacks, or a cache it cannot read)."""


@dataclass(frozen=True)
class PagedKV:
    """A paged KV cache as per-(block, KV head) tiles. key, value: [num_blocks, Hkv, block_size, D] tensors whose
    tiles are stored as `k_layout` / `v_layout` say (cpu_attention.BlockLayout); plain tiles may have any strides."""

    key: torch.Tensor
    value: torch.Tensor
    k_layout: BlockLayout = PLAIN
    v_layout: BlockLayout = PLAIN

    @classmethod
    def flash(cls, key_cache: torch.Tensor, value_cache: torch.Tensor) -> PagedKV:
        """The cache of vLLM's GPU backends: key/value [num_blocks, block_size, Hkv, D] views (no copy)."""
        return cls(key_cache.permute(0, 2, 1, 3), value_cache.permute(0, 2, 1, 3))

    def flash_views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """key, value as [num_blocks, block_size, Hkv, D] views (the Triton kernel's layout), without a copy."""
        return _flash_view(self.key, self.k_layout, "key"), _flash_view(self.value, self.v_layout, "value")


def _flash_view(tiles: torch.Tensor, layout: BlockLayout, name: str) -> torch.Tensor:
    nb, hkv, bs, d = tiles.shape
    if layout.kind == "plain":
        return tiles.permute(0, 2, 1, 3)
    if layout.kind == "transposed":  # each tile's bs * D elements are [D, bs] in memory
        return tiles.view(nb, hkv, d, bs).permute(0, 3, 1, 2)
    raise UnsupportedAttention(f"the Triton attention kernel cannot read {layout.kind!r} {name} cache tiles "
                               f"(vLLM-CPU's AMX layout); use {KERNEL_ENV}=torch")


def kernel_for(device: torch.device) -> str:
    """"torch" or "triton": the kernel `steered_rows_attention` runs for tensors on `device` (module docstring)."""
    choice = os.environ.get(KERNEL_ENV, "auto").strip().lower() or "auto"
    if choice not in KERNELS:
        raise UnsupportedAttention(f"{KERNEL_ENV} must be one of {', '.join(KERNELS)}, got {choice!r}")
    if choice == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return choice


def steered_rows_attention(q: torch.Tensor, kv: PagedKV, blocks: torch.Tensor, q_pos: torch.Tensor,
                           n_keys: torch.Tensor, bias: torch.Tensor | None, scale: float, *,
                           sliding_window: int = -1, softcap: float = 0.0, mode: str = "softmax",
                           power: float = 15.0, n_max: int | None = None) -> torch.Tensor:
    """Causal attention of R steered rows with additive key biases, read from the paged cache.

    q [R, Tq, Hq, D]: each row's queries; q_pos [R, Tq] their absolute positions, consecutive in each row
    (q_pos[r, i] = q_pos[r, 0] + i) and below the row's n_keys [R]; blocks [R, >= ceil(max n_keys / block_size)]
    the rows' block tables; bias [R, Hq, Kb] added to the scores of keys 0..Kb-1 (None: no bias); `mode`, `power`,
    `sliding_window`, `softcap` as in `cpu_attention.biased_attention`, whose math both kernels compute.
    Returns [R, Tq, Hq, D]: fp32 from the torch path, q's dtype from the Triton kernel (fp32 accumulation).
    `n_max`: max(n_keys) when the caller already knows it (saves a sync per layer).
    Raises `UnsupportedAttention` if the chosen kernel cannot compute it.
    """
    if kernel_for(q.device) == "torch":
        n_max = int(n_keys.max()) if n_max is None else n_max
        return cpu_attention.biased_attention(
            q, cpu_attention.gather_keys_t(kv.key, blocks, kv.k_layout, n_max),
            cpu_attention.gather_values(kv.value, blocks, kv.v_layout, n_max), q_pos, n_keys,
            bias if bias is not None else torch.zeros(q.shape[0], q.shape[2], 1), scale, sliding_window, softcap,
            mode, power)
    return _triton_rows(q, kv, blocks, q_pos, bias, scale, sliding_window, softcap, mode, power)


def _triton_rows(q, kv: PagedKV, blocks, q_pos, bias, scale, sliding_window, softcap, mode, power) -> torch.Tensor:
    """The Triton kernel on the rows laid out as a batch of R rows of Tq tokens each: row r's queries are the last
    Tq of its first q_pos[r, -1] + 1 keys, which is where they sit (positions consecutive)."""
    if sliding_window is not None and sliding_window > 0:
        raise UnsupportedAttention(f"the Triton attention kernel has no sliding window (model window "
                                   f"{sliding_window}); use {KERNEL_ENV}=torch")
    if softcap:
        raise UnsupportedAttention(f"the Triton attention kernel has no logit soft-capping (cap {softcap})")
    key_cache, value_cache = kv.flash_views()
    if key_cache.device != q.device:
        raise UnsupportedAttention(f"queries on {q.device} but the KV cache on {key_cache.device}")
    R, Tq, Hq, D = q.shape
    device = q.device
    attention = _triton_kernels()
    seq_lens = (q_pos[:, -1] + 1).to(device=device, dtype=torch.int32)
    query_start_loc = torch.arange(0, (R + 1) * Tq, Tq, dtype=torch.int32, device=device)
    block_table = blocks.to(device=device, dtype=torch.int32)
    key_bias = bias.to(device=device, dtype=torch.float32).contiguous() if bias is not None else None
    out, _ = attention.paged_attention(
        q.reshape(R * Tq, Hq, D), key_cache, value_cache, block_table, query_start_loc, seq_lens, scale,
        key_bias=key_bias, mode=mode, power=power, max_seq_len=block_table.shape[1] * key_cache.shape[1])
    return out.view(R, Tq, Hq, D)


def _triton_kernels():
    """kernels/attention.py, imported on first use: torch-only hosts never import triton."""
    try:
        from . import attention
    except ImportError as exc:  # no triton, or a triton that cannot load here
        raise UnsupportedAttention(f"the Triton attention kernel cannot be imported: {exc}") from exc
    return attention
