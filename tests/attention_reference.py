"""The independent reference for attention steering: HF transformers eager attention with the steering written out
plainly from its definition (docs/methods/attention-sink-and-spans.md), on the same weights as the engine under test."""
from __future__ import annotations

import math

import torch

_BIAS: dict[str, torch.Tensor] = {}  # [layers, heads, prompt keys] bias of the sequence being run now
_MODE: dict[str, dict | None] = {"mode": None}  # the spec's attention mode for the sequence being run now


def reference_bias(spec: dict | None, prompt_len: int, layers: int, heads: int,
                   role_spans: dict[str, list[tuple[int, int]]] | None = None) -> torch.Tensor:
    """ln(gamma) on key 0 and ln(alpha) on each prompt key outside a span's target, per (layer, query head)."""
    bias = torch.zeros(layers, heads, prompt_len, dtype=torch.float64)
    if spec is None:
        return bias

    def chosen(value, n):
        return range(n) if value in (None, "all") else value

    if sink := spec.get("sink"):
        for layer in chosen(sink.get("layers"), layers):
            for head in chosen(sink.get("heads"), heads):
                bias[layer, head, 0] = math.log(sink.get("gamma", 1.0))
        for key, gamma in sink.get("per_head", {}).items():
            layer, head = map(int, key.split("."))
            bias[layer, head, 0] = math.log(gamma)
    for span in spec.get("spans", []):
        target = span["target"]
        ranges = role_spans[target] if isinstance(target, str) else [(target["start"], target["end"])]
        outside = torch.ones(prompt_len, dtype=torch.bool)
        for start, end in ranges:
            outside[start:end] = False
        for layer in chosen(span.get("layers"), layers):
            for head in chosen(span.get("heads"), heads):
                bias[layer, head, outside] += math.log(span["alpha"])
    return bias


def steered_eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Eager causal attention of one unpadded sequence (HF passes no mask to a custom function), plus the current
    bias on the prompt keys of this layer, and the current attention mode (docs/methods/attention-modes.md) if it
    covers the layer."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    q, k = query.double(), key.double()
    n_q, n_k = q.shape[-2], k.shape[-2]
    position = torch.arange(n_k - n_q, n_k, dtype=torch.float64)[:, None]  # absolute query positions
    future = torch.arange(n_k)[None, :] > position
    bias = torch.zeros(q.shape[1], n_k, dtype=torch.float64)
    prompt_bias = _BIAS["bias"][module.layer_idx]
    bias[:, : prompt_bias.shape[-1]] = prompt_bias[:, : n_k]
    mode = _MODE["mode"]
    applies = mode is not None and (mode.get("layers", "all") == "all" or module.layer_idx in mode["layers"])
    kind = mode["kind"] if applies else "softmax"
    if kind in ("lssa", "lssar"):
        d = q.shape[-1]
        cos = (q / q.norm(dim=-1, keepdim=True)) @ (k / k.norm(dim=-1, keepdim=True)).transpose(2, 3)
        phi = torch.nn.functional.softplus(math.log(d) * torch.log(position + 1) * cos) * bias[:, None, :].exp()
        phi = phi.masked_fill(future, 0.0)
        weights = phi / phi.sum(-1, keepdim=True)
    else:
        scores = (q @ k.transpose(2, 3)) * scaling + bias[:, None, :]
        weights = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    if kind in ("lssar", "reweight"):
        n = position + 1
        offset = (n > 3).double()  # o_i = 0 for the first 3 query rows, 1 after
        r = torch.relu(n * weights - offset) ** mode.get("power", 15.0)
        weights = r / (r.sum(-1, keepdim=True) + 1e-8)
    out = torch.matmul(weights, value.double()).to(query.dtype)
    return out.transpose(1, 2).contiguous(), weights


def load(path):
    from transformers import AttentionInterface, AutoModelForCausalLM

    AttentionInterface.register("steered_eager", steered_eager)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="steered_eager").eval()


def logprobs(model, prompt_ids: list[int], generated: list[int], bias: torch.Tensor,
             mode: dict | None = None) -> torch.Tensor:
    """Teacher-forced next-token logprobs after the prompt and after each generated token, steered by `bias` and
    the attention `mode` (a spec's `mode` dict)."""
    _BIAS["bias"], _MODE["mode"] = bias, mode
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + generated])).logits[0, len(prompt_ids) - 1:]
    return logits.double().log_softmax(-1)
