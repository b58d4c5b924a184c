"""Attention steering inside vLLM: the attention backend override and the per-step steered rows it reads.

The steering processor (server/worker.py) sees every batch change before the step's forward and publishes the
steered rows here (`AttentionRows`); the backend then recomputes those rows' attention with their key biases
(kernels/cpu_attention.py) and overwrites the native kernel's output for them. Unsteered rows keep the native
kernel's output untouched. Registered by the plugin for `CPU_ATTN`, the backend every non-MLA model gets on CPU.
"""
from __future__ import annotations

import logging
import math

import torch

from steerserve.kernels import cpu_attention
from steerserve.steering.plan import AttentionPlan

log = logging.getLogger("steerserve.attention")

BACKEND_PATH = "steerserve.server.attention.SteeringCPUBackend"
_ENGINES: dict[int, AttentionRows] = {}  # id(VllmConfig) -> that engine's rows; one engine per config object


def layer_biases(plan: AttentionPlan, prompt_len: int, num_layers: int, num_heads: int) -> list[torch.Tensor | None]:
    """Per decoder layer, the [heads, keys] additive score bias of one request (None: layer not steered).
    Keys run from 0 to the last biased prompt key; later keys (and generated ones) get no bias."""
    has_spans = any(sp.log_alpha != 0 for sp in plan.spans)
    width = prompt_len if has_spans else 1
    biases = torch.zeros(num_layers, num_heads, width)
    if plan.sink_log_gains:
        biases[:, :, 0] += torch.tensor(plan.sink_log_gains, dtype=torch.float32).view(num_layers, num_heads)
    for sp in plan.spans:
        outside = torch.ones(width, dtype=torch.bool)
        for start, end in sp.targets:
            outside[start:end] = False
        layers, heads = torch.tensor(sp.layers, dtype=torch.long), torch.tensor(sp.heads, dtype=torch.long)
        biases[layers[:, None], heads[None, :]] += outside.float() * sp.log_alpha
    return [b if b.any() else None for b in biases]


class AttentionRows:
    """The attention-steered rows of one engine's persistent batch, as of the current step."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, list[torch.Tensor | None]]] = []  # (batch row, per-layer biases)
        self._geometry: tuple[object, list[int], list[int]] | None = None

    @staticmethod
    def for_engine(vllm_config) -> AttentionRows:
        return _ENGINES.setdefault(id(vllm_config), AttentionRows())

    def geometry(self, md) -> tuple[list[int], list[int]]:
        """query_start_loc and seq_lens of this step as lists, converted once per step (all layers share `md`)."""
        if self._geometry is None or self._geometry[0] is not md:
            self._geometry = (md, md.query_start_loc.tolist(), md.seq_lens.tolist())
        return self._geometry[1], self._geometry[2]


def _import_cpu_backend():
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

    return CPUAttentionBackend, CPUAttentionBackendImpl


_CPUBackend, _CPUImpl = _import_cpu_backend()


class SteeringCPUImpl(_CPUImpl):
    """vLLM-CPU attention, plus the exact recomputation of attention-steered rows."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from vllm.config import get_current_vllm_config

        self._rows = AttentionRows.for_engine(get_current_vllm_config())
        self._layer: int | None = None
        self._layouts: tuple[str | None, ...] | None = None

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        output = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        if attn_metadata is None or not self._rows.rows or self.attn_type != "decoder":
            return output
        if self._layer is None:
            from vllm.model_executor.models.utils import extract_layer_index

            self._layer = extract_layer_index(layer.layer_name)
        steered = [(r, b[self._layer]) for r, b in self._rows.rows if b[self._layer] is not None]
        if steered:
            self._steer(layer, query, kv_cache, attn_metadata, output, steered)
        return output

    def _cache_layouts(self, layer, kv_cache: torch.Tensor) -> tuple[str | None, ...]:
        if self._layouts is None:
            from vllm import _custom_ops as ops

            def write(k, v, kc, vc, slots):
                ops.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, layer.isa, k_scale=1.0, v_scale=1.0,
                                               kv_cache_dtype="auto")

            self._layouts = cpu_attention.block_layout(write, kv_cache.shape[2], self.head_size, kv_cache.dtype)
            if None in self._layouts or self.is_fp8_kv_cache or self.alibi_slopes is not None:
                raise RuntimeError(f"attention steering cannot read this KV cache (isa {layer.isa}, layouts "
                                   f"{self._layouts}, kv dtype {self.kv_cache_dtype})")
        return self._layouts

    def _steer(self, layer, query, kv_cache, md, output, steered) -> None:
        qsl, seq_lens = self._rows.geometry(md)
        steered = [(r, b) for r, b in steered if r < len(seq_lens) and qsl[r + 1] > qsl[r]]
        if not steered:
            return
        k_layout, v_layout = self._cache_layouts(layer, kv_cache)
        nb, Hkv, bs, _ = kv_cache.shape
        caches = kv_cache.view(nb, Hkv, 2 * bs, -1).chunk(2, dim=2)
        out = output.view(-1, self.num_heads, self.head_size)
        decode = [(r, b) for r, b in steered if qsl[r + 1] - qsl[r] == 1]
        groups = [decode] if decode else []
        groups += [[(r, b)] for r, b in steered if qsl[r + 1] - qsl[r] > 1]  # each prefill chunk on its own
        for group in groups:
            rows = [r for r, _ in group]
            q_len = max(qsl[r + 1] - qsl[r] for r in rows)
            n_keys = torch.tensor([seq_lens[r] for r in rows])
            blocks = md.block_table[rows, : math.ceil(int(n_keys.max()) / bs)]
            q = torch.stack([query[qsl[r]: qsl[r] + q_len] for r in rows]) if q_len == 1 else \
                query[qsl[rows[0]]: qsl[rows[0] + 1]][None]
            q_pos = n_keys[:, None] - q_len + torch.arange(q_len)[None, :]
            width = max(b.shape[1] for _, b in group)
            bias = torch.zeros(len(rows), self.num_heads, width)
            for i, (_, b) in enumerate(group):
                bias[i, :, : b.shape[1]] = b
            o = cpu_attention.biased_attention(
                q.view(len(rows), q_len, self.num_heads, self.head_size),
                cpu_attention.gather_keys_t(caches[0], blocks, k_layout),
                cpu_attention.gather_values(caches[1], blocks, v_layout),
                q_pos, n_keys, bias, self.scale, self.sliding_window, self.logits_soft_cap)
            for i, r in enumerate(rows):
                out[qsl[r]: qsl[r + 1]] = o[i, : qsl[r + 1] - qsl[r]].to(out.dtype)


class SteeringCPUBackend(_CPUBackend):
    @staticmethod
    def get_impl_cls():
        return SteeringCPUImpl


def register() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND_PATH)
