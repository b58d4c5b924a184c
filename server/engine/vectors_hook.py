"""Control vectors inside vLLM (steering/vectors.py defines them): add or ablate directions in the residual
stream at the output of decoder layers, per request, in the same batch as unsteered, LoRA and other steered rows.

vLLM's decoder layers return `(hidden_states, residual)`; the residual stream after layer l is their sum, which
the next layer's fused add-RMSNorm (or the final norm, after the last layer) reads. A forward hook on layer l
changes `hidden_states` only: `add` adds `scale * v_l`, `ablate` subtracts `((hidden + residual) . u) u`, so the
sum the next layer reads is the steered stream.

The work is table-driven, the shape CUDA graphs and `torch.compile` can capture:
- slots: each distinct *program* (the ops that apply to a row's prompt tokens, or to its generated tokens:
  vectors by digest, scales, modes, normalize, in order) gets one slot, shared by every row that needs it, and
  freed when its last row leaves; slot 0 is all zeros (unsteered tokens).
- persistent per-slot tables, per stage: `ablate[stage][layer]` (unit directions u) and `add[stage][layer]` (the
  sum of the stage's added vectors), `[slots, hidden]`, fp32. A program at one layer is a list of stages, each
  an optional ablation followed by the sum of the adds up to the next ablation, which is the list's order.
- once per step, a per-token slot index (from `query_start_loc`, positions and each row's prompt length);
- per selected layer and stage: a gather (`table.index_select(0, slot_index)`) and an add (ablation: a dot
  product and a multiply-add). A step without steered tokens does no work at all.

Positions, not step counts, decide prompt vs generated, so chunked prefill, prefix caching (a cached block's
tokens are not run) and recomputation after preemption see the same steering. Salt: steering/vectors.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from steerserve.steering.vectors import VectorsPlan, layer_ops

from . import forward_hook as step
from . import state as engine_state
from . import vllm_compat
from .state import Hook, MethodRows, RowContext

Stage = tuple[np.ndarray | None, np.ndarray | None]  # (unit direction to ablate, vector to add), either may be None
Program = dict[int, list[Stage]]  # decoder layer -> its stages, in order
LAYER_CALLS = [0]  # layer hooks that steered a forward (for tests and diagnostics)
ADMITTED = [0]  # rows admitted with vectors (a preempted row is admitted again when it resumes)


def program(part: VectorsPlan, tokens: str) -> tuple[tuple, Program]:
    """The ops of `part` that apply to `tokens` ("prompt" or "generated") as a slot key and a program."""
    ops = [op for op in part.ops if op.tokens in ("all", tokens)]
    key = tuple((part.vectors[op.vector].digest, op.layers, op.scale, op.mode, op.normalize) for op in ops)
    directions = part.directions() if ops else []
    prog: Program = {}
    for op in ops:
        for layer, (kind, vec) in layer_ops(op, directions[op.vector]).items():
            stages = prog.setdefault(layer, [])
            if kind == "ablate":
                stages.append((vec, None))
            elif not stages:
                stages.append((None, vec))
            else:
                u, a = stages[-1]
                stages[-1] = (u, vec if a is None else a + vec)
    return key, prog


@dataclass(eq=False)
class VectorsRow:
    """One steered row: its prompt length, and the slot keys and programs of its prompt and generated tokens
    (an empty key: those tokens are not steered). Slots are assigned by `VectorsRows`."""

    prompt_len: int
    keys: dict[str, tuple]  # "prompt" / "generated" -> slot key
    programs: dict[tuple, Program]
    context: RowContext
    slots: dict[str, int] = field(default_factory=dict)


def admit(plan, prompt_len: int, ctx: RowContext) -> VectorsRow | None:
    part = plan.vectors
    if part.is_noop():
        return None
    keys, programs = {}, {}
    for tokens in ("prompt", "generated"):
        key, prog = program(part, tokens)
        keys[tokens] = key
        if key:
            programs[key] = prog
    ADMITTED[0] += 1
    return VectorsRow(prompt_len, keys, programs, ctx)


class VectorsRows(MethodRows):
    """The rows that carry vectors, their slots, and the persistent per-slot tables of one engine."""

    family = "vectors"

    def __init__(self) -> None:
        super().__init__()
        self.slots: dict[tuple, int] = {}  # program key -> slot (>= 1)
        self.capacity = 0  # slots in the tables, slot 0 included
        self.ablate: list[torch.Tensor | None] = []  # per stage: [layers, capacity, hidden] or None
        self.add: list[torch.Tensor | None] = []
        self.layers: dict[int, list[tuple[torch.Tensor | None, torch.Tensor | None]]] = {}  # the step's tables
        self.programs: dict[tuple, Program] = {}
        self.num_layers, self.device = 0, torch.device("cpu")
        self._index = torch.zeros(0, dtype=torch.long)

    def changed(self) -> None:
        try:
            self._assign()
        except Exception as exc:  # noqa: BLE001 - never kill the engine: switch the method off, report why
            self.switch_off(f"{type(exc).__name__}: {exc}")

    def _assign(self) -> None:
        """Give every program the rows need a slot (free the others), and each row its slots."""
        needed: dict[tuple, Program] = {}
        for _, row in self.rows:
            needed.update(row.programs)
            self.num_layers, self.device = row.context.num_layers, row.context.device
        for key in [k for k in self.slots if k not in needed]:
            self._write(self.slots.pop(key), {})
            del self.programs[key]
        for key, prog in needed.items():
            if key not in self.slots:
                self.slots[key] = self._free_slot()
                self.programs[key] = prog
                self._write(self.slots[key], prog)
        for _, row in self.rows:
            row.slots = {tokens: self.slots[key] if key else 0 for tokens, key in row.keys.items()}
        self._index_layers()

    def _free_slot(self) -> int:
        used = set(self.slots.values())
        slot = next(s for s in range(1, self.capacity + 2) if s not in used)
        if slot >= self.capacity:
            self._grow(max(8, 2 * self.capacity))
        return slot

    def _grow(self, capacity: int) -> None:
        def grown(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            new = t.new_zeros((t.shape[0], capacity, t.shape[2]))
            new[:, : t.shape[1]] = t
            return new
        self.ablate, self.add = [grown(t) for t in self.ablate], [grown(t) for t in self.add]
        self.capacity = capacity

    def _table(self, tables: list[torch.Tensor | None], stage: int, hidden: int) -> torch.Tensor:
        while len(tables) <= stage:
            tables.append(None)
        if tables[stage] is None:
            tables[stage] = torch.zeros((self.num_layers, self.capacity, hidden), dtype=torch.float32,
                                        device=self.device)
        return tables[stage]

    def _write(self, slot: int, prog: Program) -> None:
        """Slot `slot` holds `prog` from now on (an empty program: zeros)."""
        for tables in (self.ablate, self.add):
            for t in tables:
                if t is not None:
                    t[:, slot] = 0
        for layer, stages in prog.items():
            for s, (u, a) in enumerate(stages):
                for tables, vec in ((self.ablate, u), (self.add, a)):
                    if vec is not None:
                        self._table(tables, s, vec.size)[layer, slot] = torch.from_numpy(vec).to(self.device)

    def _index_layers(self) -> None:
        """Per decoder layer, the stage tables any live program uses (the layer hooks skip the other layers)."""
        used: dict[int, dict[int, tuple[bool, bool]]] = {}
        for prog in self.programs.values():
            for layer, stages in prog.items():
                for s, (u, a) in enumerate(stages):
                    was = used.setdefault(layer, {}).get(s, (False, False))
                    used[layer][s] = (was[0] or u is not None, was[1] or a is not None)
        self.layers = {layer: [(self.ablate[s][layer] if has_u else None, self.add[s][layer] if has_a else None)
                               for s, (has_u, has_a) in sorted(stages.items())]
                       for layer, stages in used.items()}

    def slot_index(self, starts: list[int], positions: torch.Tensor, num_tokens: int) -> torch.Tensor | None:
        """This step's per-token slot index (length `num_tokens`), or None if no token of it is steered."""
        if self._index.numel() < num_tokens:
            self._index = torch.zeros(max(num_tokens, 2 * self._index.numel()), dtype=torch.long)
        index = self._index[:num_tokens]
        index.zero_()
        steered = False
        for r, row in self.rows:
            if r + 1 >= len(starts) or starts[r + 1] == starts[r]:
                continue
            a, b = starts[r], starts[r + 1]
            k = min(max(row.prompt_len - int(positions[a]), 0), b - a)  # a row's positions are consecutive
            p, g = row.slots.get("prompt", 0), row.slots.get("generated", 0)
            if p and k:
                index[a:a + k] = p
                steered = True
            if g and k < b - a:
                index[a + k:b] = g
                steered = True
        return index.to(self.device) if steered else None


@dataclass(frozen=True)
class StepWork:
    index: torch.Tensor  # [tokens] slot of each of the step's tokens
    layers: dict[int, list[tuple[torch.Tensor | None, torch.Tensor | None]]]


def _begin_step(rows: VectorsRows, runner, positions: torch.Tensor) -> StepWork | None:
    """This forward's slot index for the layer hooks (the engine hook's `begin_step`; attached on first use)."""
    if rows.num_layers == 0:
        return None
    positions = positions.cpu()
    if positions.dim() > 1:  # M-RoPE: one row of positions per section; the first is the token's position
        positions = positions[0]
    index = rows.slot_index(step.row_starts(runner), positions, positions.shape[0])
    if index is None:
        return None
    _attach(vllm_compat.runner_model(runner))
    return StepWork(index, rows.layers)


def _attach(model) -> None:
    if getattr(model, "_steerserve_vectors", False):
        return
    layers = vllm_compat.decoder_layers(model)
    if layers is None:
        raise RuntimeError(f"vectors: cannot find the decoder layers of {type(model).__name__}")
    for index, layer in enumerate(layers):
        layer.register_forward_hook(_layer_hook(index))
    model._steerserve_vectors = True


def _layer_hook(layer: int):
    def post(module, args, output):
        state = engine_state.running()
        work = state.step.get("vectors") if state is not None else None
        if work is None or layer not in work.layers:
            return None
        try:
            return steer(output, work.index, work.layers[layer])
        except Exception as exc:  # noqa: BLE001 - never kill the engine: switch the method off, report why
            state.rows["vectors"].switch_off(f"{type(exc).__name__}: {exc}")
            del state.step["vectors"]  # the later layers of this forward too
            return None
    return post


def steer(output, index: torch.Tensor, stages) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A decoder layer's `(hidden_states, residual)` with the stages applied to each token's slot: a gather and an
    add per stage (ablation: the component along u of the stream `hidden_states + residual` is subtracted)."""
    if not isinstance(output, tuple) or len(output) != 2:
        raise RuntimeError("a decoder layer did not return (hidden_states, residual)")
    hidden, residual = output
    if hidden.shape[0] != index.shape[0]:
        raise RuntimeError(f"{hidden.shape[0]} hidden states for {index.shape[0]} tokens")
    h = hidden if hidden.dtype == torch.float32 else hidden.float()
    for u_table, a_table in stages:
        if u_table is not None:
            u = u_table.index_select(0, index)
            stream = h if residual is None else h + residual.to(h.dtype)
            h = h - (stream * u).sum(-1, keepdim=True) * u
        if a_table is not None:
            h = h + a_table.index_select(0, index)
    LAYER_CALLS[0] += 1
    return h.to(hidden.dtype), residual


HOOK = Hook("vectors", VectorsRows, admit, _begin_step)
