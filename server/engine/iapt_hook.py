"""IAPT adapters inside vLLM (steering/iapt.py defines them): soft tokens generated per layer from each row's
instruction, in the same batch as base, LoRA and steered rows.

An IAPT request's prompt is its instruction plus 4 placeholder tokens (the server appends them). The steering
processor (server/engine/processor.py) gives each IAPT row an `IaptRow`: the adapter's generators (loaded once per worker,
LRU) and the pooling statistics gathered so far. Per step, a step hook (server/engine/forward_hook.py) finds each IAPT row's
instruction tokens and soft tokens among the step's tokens (from `query_start_loc` and positions); pre-hooks on
the decoder layers then, at every layer l, fold the instruction tokens' layer input (vLLM keeps the residual
stream as `hidden_states + residual`) into the row's softmax-pooling statistics, and overwrite the soft tokens'
stream with P_l (hidden_states = P_l, residual = 0). The statistics merge across steps, so chunked prefill is
exact: all instruction tokens precede the soft tokens, so every one of them has been folded in by the time a
soft token runs. A chunk that starts at position 0 (a new prefill, or a recompute after preemption) starts over.

Prefix caching: a cached block holds keys and values, not the hidden states the pooling needs, so IAPT requests
never read the prefix cache (`skip_reading_prefix_cache`), and their blocks are salted by adapter so no other
request reads them. Decode steps cost one dictionary lookup per layer.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from steerserve.steering.iapt import SOFT_TOKENS, IaptModel, Pool, merge_pools
from steerserve.steering.methods.iapt import IaptPlan

from . import forward_hook as step
from . import state as engine_state
from . import vllm_compat
from .state import Hook, MethodRows, RowContext

CACHE_ENV = "STEERSERVE_IAPT_CACHE"  # env: adapters each worker keeps loaded (LRU)

_MODELS: OrderedDict[str, IaptModel] = OrderedDict()  # this worker's loaded adapters, least recently used first
LAYER_CALLS = [0]  # layer hooks that changed a forward (for tests and diagnostics)


@dataclass(eq=False)
class IaptRow:
    """One IAPT row: its adapter, its instruction length, and its pooling statistics per decoder layer."""

    model: IaptModel
    instruction_len: int
    pools: dict[int, Pool] = field(default_factory=dict)


@dataclass(frozen=True)
class RowWork:
    """One row's part of one step: its instruction tokens and soft tokens as slices of the step's tokens."""

    row: IaptRow
    batch_row: int  # its row in the persistent batch
    instruction: slice  # empty if none in this step
    soft: slice
    first_slot: int  # the soft slot (0..3) of the first soft token in `soft`


def plan_part(path: Path, key: str | None = None) -> IaptPlan:
    """A request's IAPT adapter as a plan part; `key` names this registration of it in the workers' caches
    (default: the path)."""
    return IaptPlan(str(path), key or str(path))


def admit(plan, prompt_len: int, ctx: RowContext) -> IaptRow | None:
    """A new row's IAPT state (its adapter, loaded in this worker), or None if its plan has no adapter."""
    part = plan.iapt
    if part.is_noop():
        return None
    return IaptRow(load(part, ctx.device), prompt_len - SOFT_TOKENS)


def load(part: IaptPlan, device: torch.device) -> IaptModel:
    """The adapter a request's plan names, from this worker's LRU of loaded adapters."""
    key = part.key or part.path
    model = _MODELS.get(key)
    if model is None:
        model = _MODELS[key] = IaptModel.load(Path(part.path), device)
        while len(_MODELS) > max(1, int(os.environ.get(CACHE_ENV, "8"))):
            _MODELS.popitem(last=False)
    _MODELS.move_to_end(key)
    return model


class IaptRows(MethodRows):
    """The IAPT rows of one engine's persistent batch, set by the steering processor when the batch changes."""

    family = "iapt"

    def work(self, starts: list[int], positions: torch.Tensor) -> list[RowWork]:
        out = []
        for r, row in self.rows:
            if r + 1 >= len(starts) or starts[r + 1] == starts[r]:
                continue
            a, b = starts[r], starts[r + 1]
            first = int(positions[a])  # a row's tokens in a step have consecutive positions
            n = row.instruction_len
            if first >= n + SOFT_TOKENS:
                continue  # decoding
            if first == 0:
                row.pools = {}
            last = first + (b - a)  # exclusive
            ins_end = min(n, last)
            soft_start, soft_end = max(first, n), min(n + SOFT_TOKENS, last)
            out.append(RowWork(row, r, slice(a, a + max(0, ins_end - first)),
                               slice(a + soft_start - first, a + max(soft_start, soft_end) - first), soft_start - n))
        return out


def _begin_step(rows: IaptRows, runner, positions) -> list[RowWork] | None:
    """This forward's IAPT work for the layer hooks (the engine hook's `begin_step`; attached on first use)."""
    work = rows.work(step.row_starts(runner), positions.cpu())
    if work:
        _attach(vllm_compat.runner_model(runner))
    return work or None


def decoder_layers(model) -> list | None:
    """The decoder layers of a vLLM model whose layers take (positions, hidden_states, residual), or None."""
    return vllm_compat.decoder_layers(model)


def _attach(model) -> None:
    if getattr(model, "_steerserve_iapt", False):
        return
    layers = decoder_layers(model)
    if layers is None:
        raise RuntimeError(f"IAPT: cannot find the decoder layers of {type(model).__name__}")
    for index, layer in enumerate(layers):
        layer.register_forward_pre_hook(_layer_hook(index))
    model._steerserve_iapt = True


def _layer_hook(layer: int):
    def pre(module, args):
        state = engine_state.running()
        work = state.step.get("iapt") if state is not None else None
        if work is None:
            return None
        try:
            return _apply(layer, work, args, state)
        except Exception as exc:  # noqa: BLE001 - never kill the engine: switch the method off, report why
            state.rows["iapt"].switch_off(f"{type(exc).__name__}: {exc}")
            del state.step["iapt"]  # the later layers of this forward too
            return None
    return pre


def _apply(layer: int, work: list[RowWork], args: tuple, state: engine_state.EngineState):
    """Fold this layer's instruction tokens into their rows' pools; overwrite the soft tokens (new args or None).
    A row whose own work fails is that row's fault (`EngineState.fail_row`): it leaves `work`, the others go on."""
    positions, hidden, residual, *rest = args
    soft = [w for w in work if w.soft.start < w.soft.stop]
    if soft:
        hidden = hidden.clone()
        residual = residual.clone() if residual is not None else None
    for w in list(work):
        try:
            if w.instruction.start < w.instruction.stop:
                stream = hidden[w.instruction] if residual is None else hidden[w.instruction] + residual[w.instruction]
                w.row.pools[layer] = merge_pools(w.row.pools.get(layer), w.row.model.pool_partial(layer, stream))
            if w.soft.start < w.soft.stop:
                p = w.row.model.finish(layer, w.row.pools[layer])
                count = w.soft.stop - w.soft.start
                hidden[w.soft] = p[w.first_slot:w.first_slot + count].to(hidden.dtype)
                if residual is not None:
                    residual[w.soft] = 0
        except Exception as exc:  # noqa: BLE001 - this row's fault: fail its request, not the step
            work.remove(w)
            state.fail_row("iapt", w.batch_row, f"{type(exc).__name__}: {exc}")
    if not soft:
        return None
    LAYER_CALLS[0] += 1
    return (positions, hidden, residual, *rest)


HOOK = Hook("iapt", IaptRows, admit, _begin_step)
