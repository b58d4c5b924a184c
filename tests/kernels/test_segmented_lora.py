"""The segmented multi-adapter LoRA math (kernels/segmented_lora.py) against a per-row float64 reference written
out here, the base-row invariant (rows without an adapter bit-identical), and the per-slot fallback."""
from __future__ import annotations

import pytest
import torch

from steerserve.kernels import segmented_lora

SLOTS, R, IN, OUT = 6, 4, 40, 56

PATTERNS = {
    "distinct": [0, 1, 2, 3, 4, 5],
    "distinct-with-base": [3, -1, 0, 5, -1, 1, 2, -1, 4],
    "unsorted-repeats": [2, 0, 2, 5, 0, 0, -1, 2, 5, 1],
    "one-adapter": [4, 4, 4],
    "base-only": [-1, -1, -1, -1],
    "one-row": [5],
    "prefill-and-decode": [1] * 37 + [0, 3, -1, 5, 2],
}


def weights(gen, dtype=torch.float32):
    return (torch.randn(SLOTS, 1, R, IN, generator=gen).to(dtype), torch.randn(SLOTS, 1, OUT, R, generator=gen).to(dtype))


def reference(x, a, b, indices, scale):
    """Per row, in float64: (scale * x @ A[slot].T) @ B[slot].T, or 0 for a negative slot."""
    out = torch.zeros(x.shape[0], OUT, dtype=torch.float64)
    for row, slot in enumerate(indices.tolist()):
        if slot >= 0:
            out[row] = (scale * x[row].double() @ a[slot, 0].double().T) @ b[slot, 0].double().T
    return out


def lora(x, a, b, indices, y, scale, width=R):
    """shrink into a (possibly wider) buffer, then expand-add into y, as vLLM's punica wrapper calls the ops."""
    groups = segmented_lora.row_groups(indices, SLOTS)
    buffer = torch.full((x.shape[0], width), 7.0)
    segmented_lora.shrink(x, a.squeeze(1), buffer[:, :R], groups, scale)
    segmented_lora.expand(buffer[:, :R], b.squeeze(1), y, groups, add=True, weights_t=segmented_lora.transposed(b))
    return buffer


@pytest.mark.parametrize("pattern", PATTERNS)
def test_each_row_gets_its_own_adapter_and_base_rows_are_untouched(pattern):
    gen = torch.Generator().manual_seed(0)
    a, b = weights(gen)
    idx = torch.tensor(PATTERNS[pattern])
    x, y0 = torch.randn(len(idx), IN, generator=gen), torch.randn(len(idx), OUT, generator=gen)
    y = y0.clone()
    buffer = lora(x, a, b, idx, y, 0.5, width=R + 3)
    torch.testing.assert_close(y.double(), y0.double() + reference(x, a, b, idx, 0.5), rtol=1e-5, atol=1e-5)
    base = idx < 0
    assert torch.equal(y[base], y0[base])  # bit for bit
    assert torch.equal(buffer[base, :R], torch.zeros(int(base.sum()), R))  # shrink gives base rows nothing
    assert torch.equal(buffer[:, R:], torch.full((len(idx), 3), 7.0))  # and writes only its r columns


def test_overwrite_form_and_a_slice_of_a_wider_output():
    gen = torch.Generator().manual_seed(1)
    a, b = weights(gen)
    idx = torch.tensor(PATTERNS["distinct-with-base"])
    x = torch.randn(len(idx), IN, generator=gen)
    buffer = torch.empty(len(idx), R)
    groups = segmented_lora.row_groups(idx, SLOTS)
    segmented_lora.shrink(x, a.squeeze(1), buffer, groups, 1.0)
    wide = torch.randn(len(idx), OUT + 8, generator=gen)
    expected = wide.clone().double()
    expected[:, 4: 4 + OUT] = reference(x, a, b, idx, 1.0)
    segmented_lora.expand(buffer, b.squeeze(1), wide[:, 4: 4 + OUT], groups, add=False)
    torch.testing.assert_close(wide.double(), expected, rtol=1e-5, atol=1e-5)


def test_both_strategies_are_exercised():
    """Padding where it at most doubles the rows (decode: one row per request), segments otherwise."""
    groups = {name: segmented_lora.row_groups(torch.tensor(p), SLOTS) for name, p in PATTERNS.items()}
    assert groups["distinct"].padded and groups["distinct"].valid is None  # no padding at all
    assert groups["unsorted-repeats"].padded and groups["unsorted-repeats"].valid is not None
    assert groups["unsorted-repeats"].present_index is not None  # slots 3, 4 absent: weights gathered
    assert not groups["prefill-and-decode"].padded and groups["prefill-and-decode"].single is None


def test_segments_from_prefill_metadata_equal_the_per_row_grouping():
    """vLLM's prefill ops pass (segment lengths, segment slots); the grouping must be the per-row one."""
    seq_lens, seg_slots = torch.tensor([3, 1, 4, 2]), torch.tensor([2, -1, 0, 2])
    by_segments = segmented_lora.segment_groups(seq_lens, seg_slots, SLOTS)
    by_rows = segmented_lora.row_groups(torch.repeat_interleave(seg_slots, seq_lens), SLOTS)
    assert torch.equal(by_segments.order, by_rows.order) and torch.equal(by_segments.offsets, by_rows.offsets)
    assert (by_segments.padded, by_segments.width) == (by_rows.padded, by_rows.width)


def test_fallback_without_grouped_mm_gives_the_same_numbers(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    a, b = weights(gen)
    idx = torch.tensor(PATTERNS["prefill-and-decode"])
    x, y0 = torch.randn(len(idx), IN, generator=gen), torch.randn(len(idx), OUT, generator=gen)
    fast = y0.clone()
    lora(x, a, b, idx, fast, 0.25)
    monkeypatch.delattr(torch, "_grouped_mm", raising=False)
    slow = y0.clone()
    lora(x, a, b, idx, slow, 0.25)
    torch.testing.assert_close(slow, fast, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(slow.double(), y0.double() + reference(x, a, b, idx, 0.25), rtol=1e-5, atol=1e-5)


def test_bf16_weights_with_an_fp32_buffer():
    """vLLM keeps the shrink buffer in fp32 whatever the model dtype: the weights are cast, not the buffer."""
    gen = torch.Generator().manual_seed(3)
    a, b = weights(gen, torch.bfloat16)
    idx = torch.tensor(PATTERNS["distinct-with-base"])
    x, y0 = torch.randn(len(idx), IN, generator=gen).bfloat16(), torch.randn(len(idx), OUT, generator=gen).bfloat16()
    y = y0.clone()
    lora(x, a, b, idx, y, 0.5)
    torch.testing.assert_close(y.double(), y0.double() + reference(x, a, b, idx, 0.5), rtol=3e-2, atol=3e-2)
    assert torch.equal(y[idx < 0], y0[idx < 0])


def test_grouping_is_by_value_and_refuses_a_slot_out_of_range():
    idx = torch.tensor([2, -1, 0, 2])
    groups = segmented_lora.row_groups(idx, SLOTS)
    assert segmented_lora.row_groups(idx.clone(), SLOTS) is groups  # same values: computed once per step
    assert groups.order.tolist() == [2, 0, 3] and groups.present == (0, 2)
    assert groups.offsets.tolist() == [1, 1, 3, 3, 3, 3]
    idx[1] = 1  # the same tensor changed in place (vLLM reuses its index buffers): a new grouping
    assert segmented_lora.row_groups(idx, SLOTS).order.tolist() == [2, 1, 0, 3]
    assert segmented_lora.row_groups(torch.tensor([3, 3]), SLOTS).single == 3
    assert segmented_lora.row_groups(torch.tensor([-1, -1]), SLOTS).single == -1
    with pytest.raises(IndexError, match="slot 6"):
        segmented_lora.row_groups(torch.tensor([0, 6]), SLOTS)


def test_transposed_expand_weights_follow_in_place_loads():
    """The kept transposed copy must never outlive a change of the weights (vLLM loads adapters in place)."""
    b = torch.randn(SLOTS, 1, OUT, R)
    first = segmented_lora.transposed(b)
    assert torch.equal(first, b.squeeze(1).transpose(1, 2)) and first.is_contiguous()
    assert segmented_lora.transposed(b) is first
    b[2, 0].mul_(2.0)  # an adapter loaded into slot 2
    second = segmented_lora.transposed(b)
    assert second is not first and torch.equal(second, b.squeeze(1).transpose(1, 2))
    other = b.clone()  # another tensor with the same values and version: its own entry
    assert segmented_lora.transposed(other) is not second
    with torch.inference_mode():
        frozen = torch.randn(SLOTS, 1, OUT, R)  # no version counter: the view, never a kept copy
    assert torch.equal(segmented_lora.transposed(frozen), frozen.squeeze(1).transpose(1, 2))
