"""The fixed, grouped torch LoRA ops (server/engine/lora_ops_patch.py) against a per-row reference written out here."""
from __future__ import annotations

import pytest
import torch

from steerserve.server.engine import lora_ops_patch

SLOTS, R, IN, OUT = 3, 4, 16, 24


def reference_delta(x, a, b, indices, scale):
    """Per row: x @ A[slot].T @ B[slot].T * scale, or 0 for index -1 (the base model)."""
    out = torch.zeros(x.shape[0], OUT)
    for row, slot in enumerate(indices.tolist()):
        if slot >= 0:
            out[row] = scale * (x[row] @ a[slot, 0].T) @ b[slot, 0].T
    return out


@pytest.mark.parametrize("indices", [[0, 1, 2, -1, 2], [-1, -1, -1], [2, 2, 2, 2], [1, -1, 1, 0], [-1, 2]])
def test_shrink_then_expand_applies_each_rows_adapter(indices):
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(SLOTS, 1, R, IN, generator=gen), torch.randn(SLOTS, 1, OUT, R, generator=gen)
    idx = torch.tensor(indices)
    x, y0 = torch.randn(len(indices), IN, generator=gen), torch.randn(len(indices), OUT, generator=gen)
    buffer, y = torch.full((len(indices), R), 7.0), y0.clone()
    lora_ops_patch.bgmv_shrink(x, a, buffer, idx, 0.5)
    lora_ops_patch.bgmv_expand(buffer, b, y, idx, add_inputs=True)
    torch.testing.assert_close(y, y0 + reference_delta(x, a, b, idx, 0.5), rtol=1e-5, atol=1e-5)
    assert torch.equal(y[idx < 0], y0[idx < 0])  # base rows untouched, bit for bit
    # a slice of a wider output, and the overwrite (not add) form
    wide = torch.randn(len(indices), OUT + 8, generator=gen)
    expected = wide.clone()
    expected[:, 4:4 + OUT] = reference_delta(x, a, b, idx, 0.5)
    lora_ops_patch.bgmv_expand_slice(buffer, b, wide, idx, 4, OUT, add_inputs=False)
    torch.testing.assert_close(wide, expected, rtol=1e-5, atol=1e-5)


def test_apply_is_idempotent_and_removable():
    from vllm.lora.punica_wrapper import punica_cpu

    lora_ops_patch.apply()
    lora_ops_patch.apply()
    assert lora_ops_patch.is_applied()
    patched = punica_cpu.bgmv_shrink
    lora_ops_patch.remove()
    assert not hasattr(punica_cpu.bgmv_shrink, "__steerserve_original__")
    lora_ops_patch.apply()
    assert lora_ops_patch.is_applied() and punica_cpu.bgmv_shrink is not patched


def test_prefill_ops_take_segments_and_keep_base_segments_untouched():
    """vLLM V1 calls the sgmv ops every step, with (segment starts, lengths, slots): same result as per row."""
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(SLOTS, 1, R, IN, generator=gen), torch.randn(SLOTS, 1, OUT, R, generator=gen)
    lengths, slots = torch.tensor([3, 2, 1, 4]), torch.tensor([2, -1, 0, 1])
    starts = torch.cumsum(lengths, 0) - lengths
    idx = torch.repeat_interleave(slots, lengths)
    x, y0 = torch.randn(len(idx), IN, generator=gen), torch.randn(len(idx), OUT + 4, generator=gen)
    meta = (starts, lengths, slots, 4, 4, len(idx))
    buffer, y = torch.full((len(idx), R), 7.0), y0.clone()
    lora_ops_patch.sgmv_shrink(x, a, buffer, *meta, 0.5)
    lora_ops_patch.sgmv_expand_slice(buffer, b, y, *meta, 2, OUT, True)
    expected = y0.clone()
    expected[:, 2:2 + OUT] += reference_delta(x, a, b, idx, 0.5)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(y[idx < 0], y0[idx < 0])
    narrow = torch.zeros(len(idx), OUT)
    lora_ops_patch.sgmv_expand(buffer, b, narrow, *meta, False)
    torch.testing.assert_close(narrow, reference_delta(x, a, b, idx, 0.5), rtol=1e-5, atol=1e-5)


def test_prefill_ops_whose_segments_do_not_cover_the_rows_take_the_stock_path():
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(SLOTS, 1, R, IN, generator=gen)
    lengths, slots = torch.tensor([2, 2]), torch.tensor([0, 1])
    x, buffer = torch.randn(3, IN, generator=gen), torch.zeros(3, R)
    with pytest.raises(RuntimeError):  # the stock op's own error: 4 segment rows for 3 input rows
        lora_ops_patch.sgmv_shrink(x, a, buffer, torch.tensor([0, 2]), lengths, slots, 2, 2, 4, 1.0)
