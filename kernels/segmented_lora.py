"""Multi-adapter LoRA math on CPU: every adapter's rows of a batch in one segmented matmul per projection.

A batch row carries an adapter slot (`indices[row]`, an index into stacked weights `[slots, out, in]`) or a
negative index for "no adapter" (the base model). `RowGroups` sorts the rows that have an adapter by slot once
(stable, so each slot's rows keep their batch order); `shrink` and `expand` then gather those rows into one
contiguous block, run one segmented matmul over it (`torch._grouped_mm`: slot s multiplies rows
`offsets[s-1]:offsets[s]` of the block by weight s; one C++ call whatever the number of adapters), and scatter the
result back. Each row's result is the plain matmul of that row with its slot's weight (the same numbers as a
per-adapter loop), and rows with a negative index are never read into the block nor written by `expand`: the
base rows of a batch stay bit-identical to a run without adapters.

Two shortcuts skip the gather and scatter: a batch with no adapter row does nothing, and a batch whose every row
has the same slot is one plain matmul. Where `torch._grouped_mm` is missing (torch < 2.8) or refuses the inputs,
the segments run as one matmul per slot present (the same numbers, more calls).

The grouping depends only on the indices' values; a step's dozens of projections share one `RowGroups`
(`row_groups` keeps the last few by value: the indices of one step are the same tensor values for every layer).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

__all__ = ["RowGroups", "row_groups", "shrink", "expand"]

_CACHE: OrderedDict[tuple, RowGroups] = OrderedDict()
_CACHE_SIZE = 8


@dataclass(frozen=True)
class RowGroups:
    """Rows of a batch grouped by adapter slot.

    `single`: the slot every row has (-1 when no row has an adapter), or None for a mixed batch; for a mixed
    batch `order` holds the rows with an adapter, sorted by slot (stable), `offsets[s]` (int32, one per slot)
    the end of slot s's rows in `order`, and `present` the slots with at least one row (for the fallback)."""

    rows: int
    single: int | None
    order: torch.Tensor | None = None
    offsets: torch.Tensor | None = None
    present: tuple[int, ...] = ()


def row_groups(indices: torch.Tensor, slots: int) -> RowGroups:
    """The `RowGroups` of a 1-D integer tensor of slots (negative: no adapter) for weights with `slots` slots;
    cached by value. IndexError for a slot >= `slots` (as indexing the weights would raise)."""
    flat = indices.reshape(-1)
    key = (slots, str(flat.dtype), flat.numel(), flat.cpu().contiguous().numpy().tobytes())
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit
    groups = _build(flat, slots)
    _CACHE[key] = groups
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return groups


def _build(flat: torch.Tensor, slots: int) -> RowGroups:
    rows = flat.numel()
    if rows == 0:
        return RowGroups(0, -1)
    lo, hi = int(flat.min()), int(flat.max())
    if hi >= slots:
        raise IndexError(f"adapter slot {hi} out of range for {slots} slots")
    if hi < 0 or lo == hi:
        return RowGroups(rows, -1 if hi < 0 else hi)
    keep = (flat >= 0).nonzero(as_tuple=True)[0]
    kept = flat.index_select(0, keep)
    order = keep.index_select(0, torch.argsort(kept, stable=True))
    counts = torch.bincount(kept, minlength=slots)
    present = tuple(int(s) for s in counts.nonzero(as_tuple=True)[0].tolist())
    return RowGroups(rows, None, order, torch.cumsum(counts, 0).to(torch.int32), present)


def _segmented(block: torch.Tensor, weights_t: torch.Tensor, groups: RowGroups) -> torch.Tensor:
    """block[i] @ weights_t[slot of i] for the sorted block of `groups.order` rows; weights_t is [slots, k, n]."""
    grouped_mm = getattr(torch, "_grouped_mm", None)
    if grouped_mm is not None:
        try:
            return grouped_mm(block, weights_t, groups.offsets)
        except (RuntimeError, TypeError, NotImplementedError):
            pass
    out = block.new_empty(block.shape[0], weights_t.shape[2])
    ends = groups.offsets.tolist()
    for slot in groups.present:
        start = ends[slot - 1] if slot else 0
        torch.matmul(block[start: ends[slot]], weights_t[slot], out=out[start: ends[slot]])
    return out


def shrink(x: torch.Tensor, weights: torch.Tensor, out: torch.Tensor, groups: RowGroups, scaling: float) -> None:
    """out = scaling * x @ weights[slot].T per row, 0 for rows without an adapter. x [rows, in], weights
    [slots, r, in] (any dtype: cast to out's), out [rows, r] (a view is fine)."""
    if groups.single is not None:
        if groups.single < 0:
            out.zero_()
        else:
            out.copy_(scaling * (x.to(out.dtype) @ weights[groups.single].to(out.dtype).t()))
        return
    block = x.index_select(0, groups.order).to(out.dtype)
    result = _segmented(block, weights.to(out.dtype).transpose(1, 2), groups)
    if scaling != 1.0:
        result.mul_(scaling)
    out.zero_()
    out.index_copy_(0, groups.order, result)


def expand(x: torch.Tensor, weights: torch.Tensor, y: torch.Tensor, groups: RowGroups, add: bool) -> None:
    """y (+)= x @ weights[slot].T per row; rows without an adapter are not written when `add` (else zeroed).
    x [rows, r] (cast to y's dtype), weights [slots, >= n, r] (the first n = y.shape[1] outputs), y [rows, n]."""
    if not add:
        y.zero_()
    if groups.single is not None:
        if groups.single >= 0:
            y += x.to(y.dtype) @ weights[groups.single, : y.shape[1]].to(y.dtype).t()
        return
    block = x.index_select(0, groups.order).to(y.dtype)
    result = _segmented(block, weights[:, : y.shape[1]].to(y.dtype).transpose(1, 2), groups)
    y.index_add_(0, groups.order, result)
