"""The independent reference for control vectors: forward hooks on HF transformers' decoder layers that apply a
`vectors` spec item by item, from its definition (docs/methods/vectors.md), to the full residual stream HF
returns from `model.model.layers[l]`. Nothing here imports steerserve's vector code."""
from __future__ import annotations

from contextlib import contextmanager

import torch


def _directions(item: dict, store: dict | None) -> dict[int, torch.Tensor]:
    raw = item["data"] if "data" in item else store[item["name"]]
    return {int(layer): torch.as_tensor(list(v) if not hasattr(v, "shape") else v, dtype=torch.float32)
            for layer, v in raw.items()}


@contextmanager
def steered(model, items: list[dict] | None, prompt_len: int, store: dict | None = None):
    """While active, `model` (one sequence per forward, positions 0..n-1) applies `items` at its decoder layers'
    outputs: add `scale * v` (v normalised first if `normalize`) or ablate `u = v / |v|`, to the tokens
    `tokens` selects (prompt: positions < prompt_len; generated: positions >= prompt_len)."""
    handles = []
    items = items or []
    for index, layer_module in enumerate(model.model.layers):
        def hook(module, args, out, layer=index):
            hidden = out[0] if isinstance(out, tuple) else out
            h = hidden.clone()
            positions = torch.arange(h.shape[1])
            for item in items:
                dirs = _directions(item, store)
                layers = sorted(dirs) if item.get("layers", "all") == "all" else item["layers"]
                if layer not in layers:
                    continue
                tokens = item.get("tokens", "all")
                select = (positions < prompt_len if tokens == "prompt" else positions >= prompt_len
                          if tokens == "generated" else torch.ones_like(positions, dtype=torch.bool))
                v = dirs[layer]
                if item.get("mode", "add") == "ablate":
                    u = v / v.norm()
                    h[0, select] -= (h[0, select] @ u)[:, None] * u
                else:
                    scale = item.get("scale", 1.0)
                    h[0, select] += scale * (v / v.norm() if item.get("normalize") else v)
            return (h, *out[1:]) if isinstance(out, tuple) else h
        handles.append(layer_module.register_forward_hook(hook))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
