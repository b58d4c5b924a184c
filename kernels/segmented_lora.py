"""Multi-adapter LoRA math on CPU: every adapter's rows of a batch in one batched matmul per projection.

A batch row carries an adapter slot (`indices[row]`, an index into stacked weights `[slots, out, in]`) or a
negative index for "no adapter" (the base model). `RowGroups` sorts the rows that have an adapter by slot once
(stable, so each slot's rows keep their batch order); `shrink` and `expand` then gather those rows, run one
matmul call over all adapters, and scatter the result back:

- padded (`torch.bmm`): each adapter's rows padded to the largest group's count, one `[groups, width, in]` block;
  chosen when padding at most doubles the rows, e.g. decode steps, where each request is one row;
- segmented (`torch._grouped_mm`: slot s multiplies rows `offsets[s-1]:offsets[s]` of the sorted block) when a
  long prefill shares the step with other adapters' rows and padding would waste more.

Each row's result is its row times its slot's weight; the order of the additions inside a matmul may differ from a
one-adapter matmul (float rounding, 1e-7 relative in fp32). Rows with a negative index are never read into the
block nor written by `expand`: the base rows of a batch stay bit-identical to a run without adapters.

Two shortcuts skip the gather and scatter: a batch with no adapter row does nothing, and a batch whose every row
has the same slot is one plain matmul. Where `torch._grouped_mm` is missing (torch < 2.8) or refuses the inputs,
the segments run as one matmul per slot present.

The grouping depends only on the indices' values; a step's dozens of projections share one `RowGroups` (the
last few are kept by value: the indices of one step are the same values for every layer and projection).
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

__all__ = ["RowGroups", "row_groups", "segment_groups", "shrink", "expand", "transposed"]

_CACHE: OrderedDict[tuple, RowGroups] = OrderedDict()
_CACHE_SIZE = 8
# id(stacked weights) -> (weak reference to them, their version counter, contiguous transposed copy)
_TRANSPOSED: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}
TRANSPOSED_BUDGET_BYTES = 512 * 2**20


@dataclass(frozen=True)
class RowGroups:
    """Rows of a batch grouped by adapter slot.

    `single`: the slot every row has (-1 when no row has an adapter), or None for a mixed batch. For a mixed
    batch: `order` holds the rows with an adapter, sorted by slot (stable); `offsets[s]` (int32, one per slot)
    the end of slot s's rows in `order`; `present` the slots with at least one row. When padding is cheap
    (`padded`), the matmul is one `bmm` over a [groups, width, in] block: group g is slot `present[g]`, `gather`
    the rows that fill it (padding repeats a real row; its results are dropped), `valid` the positions of
    `order`'s rows in the flattened block (None: no padding, the block is `order` itself)."""

    rows: int
    single: int | None
    order: torch.Tensor | None = None
    offsets: torch.Tensor | None = None
    present: tuple[int, ...] = ()
    padded: bool = False
    width: int = 0
    gather: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    present_index: torch.Tensor | None = None  # `present` as a tensor, None when every slot is present


def row_groups(indices: torch.Tensor, slots: int) -> RowGroups:
    """The `RowGroups` of a 1-D integer tensor of slots (negative: no adapter) for weights with `slots` slots;
    cached by value. IndexError for a slot >= `slots` (as indexing the weights would raise)."""
    flat = indices.reshape(-1)
    return _cached(("rows", slots, str(flat.dtype), flat.numel(), _bytes(flat)), lambda: _build(flat, slots))


def segment_groups(seq_lens: torch.Tensor, segment_slots: torch.Tensor, slots: int) -> RowGroups:
    """`row_groups` of the rows of consecutive segments (`seq_lens[i]` rows with slot `segment_slots[i]`: vLLM's
    prefill metadata), cached by the segments' values, so the per-row indices are built once per step."""
    return _cached(("segments", slots, _bytes(seq_lens), _bytes(segment_slots)),
                   lambda: _build(torch.repeat_interleave(segment_slots, seq_lens), slots))


def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().numpy().tobytes()


def _cached(key: tuple, build) -> RowGroups:
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit
    groups = build()
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
    sorted_slots, by_slot = torch.sort(kept, stable=True)
    order = keep.index_select(0, by_slot)
    counts = torch.bincount(kept, minlength=slots)
    present_t = counts.nonzero(as_tuple=True)[0]
    present = tuple(int(s) for s in present_t.tolist())
    offsets = torch.cumsum(counts, 0)
    width = int(counts.max())
    base = dict(rows=rows, single=None, order=order, offsets=offsets.to(torch.int32), present=present)
    if len(present) * width > 2 * order.numel():  # padding would more than double the rows: segmented matmul
        return RowGroups(**base)
    group_of_slot = torch.zeros(slots, dtype=torch.long)
    group_of_slot[present_t] = torch.arange(len(present))
    start_of_slot = offsets - counts
    position = torch.arange(order.numel()) - start_of_slot[sorted_slots]
    valid = group_of_slot[sorted_slots] * width + position
    gather = torch.full((len(present) * width,), int(order[0]), dtype=torch.long)
    gather[valid] = order
    dense = len(present) * width == order.numel()
    return RowGroups(**base, padded=True, width=width, gather=order if dense else gather,
                     valid=None if dense else valid,
                     present_index=None if len(present) == slots else present_t)


def _grouped_matmul(x: torch.Tensor, weights_t: torch.Tensor, groups: RowGroups) -> torch.Tensor:
    """x[row] @ weights_t[slot of row] for the rows of `groups.order`, in that order; weights_t is [slots, k, n]."""
    if groups.padded:
        w = weights_t if groups.present_index is None else weights_t.index_select(0, groups.present_index)
        block = x.index_select(0, groups.gather).view(len(groups.present), groups.width, x.shape[1])
        out = torch.bmm(block, w).view(-1, weights_t.shape[2])
        return out if groups.valid is None else out.index_select(0, groups.valid)
    block = x.index_select(0, groups.order)
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
    result = _grouped_matmul(x.to(out.dtype), weights.to(out.dtype).transpose(1, 2), groups)
    if scaling != 1.0:
        result.mul_(scaling)
    out.zero_()
    out.index_copy_(0, groups.order, result)


def transposed(stacked: torch.Tensor) -> torch.Tensor:
    """Expand weights `[slots, (1,) out, r]` as `[slots, r, out]`, contiguous: CPU `bmm` over the transposed view
    (r contiguous) is several times slower. The copy is kept while the same tensor object lives with the same
    version counter (vLLM loads an adapter into a slot in place, which bumps it), up to
    TRANSPOSED_BUDGET_BYTES in all; where the version cannot be read (inference tensors), the view."""
    w = stacked.squeeze(1) if stacked.dim() == 4 else stacked
    try:
        version = stacked._version
    except RuntimeError:
        return w.transpose(1, 2)
    key = id(stacked)
    entry = _TRANSPOSED.get(key)
    if entry is not None and entry[0]() is stacked and entry[1] == version:
        return entry[2]
    copy = w.transpose(1, 2).contiguous()
    held = sum(e[2].nbytes for k, e in _TRANSPOSED.items() if k != key)
    if held + copy.nbytes <= TRANSPOSED_BUDGET_BYTES:
        _TRANSPOSED[key] = (weakref.ref(stacked, lambda ref, key=key: _forget(key, ref)), version, copy)
    return copy


def _forget(key: int, ref: weakref.ref) -> None:
    entry = _TRANSPOSED.get(key)
    if entry is not None and entry[0] is ref:
        del _TRANSPOSED[key]


def expand(x: torch.Tensor, weights: torch.Tensor, y: torch.Tensor, groups: RowGroups, add: bool,
           weights_t: torch.Tensor | None = None) -> None:
    """y (+)= x @ weights[slot].T per row; rows without an adapter are not written when `add` (else zeroed).
    x [rows, r] (cast to y's dtype), weights [slots, >= n, r] (the first n = y.shape[1] outputs), y [rows, n];
    `weights_t`, optional, the same weights as [slots, r, >= n] (`transposed`), for the batched matmul."""
    if not add:
        y.zero_()
    if groups.single is not None:
        if groups.single >= 0:
            y += x.to(y.dtype) @ weights[groups.single, : y.shape[1]].to(y.dtype).t()
        return
    w_t = weights.transpose(1, 2) if weights_t is None else weights_t
    result = _grouped_matmul(x.to(y.dtype), w_t[:, :, : y.shape[1]].to(y.dtype), groups)
    y.index_add_(0, groups.order, result)
