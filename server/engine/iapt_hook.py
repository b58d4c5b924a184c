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

from steerserve.steering.iapt import SOFT_TOKENS, IaptConfig, IaptModel, Pool, merge_pools

from . import faults, vllm_compat
from . import forward_hook as step

ARGS_KEY = "steerserve_iapt"  # extra_args: {"path": adapter directory, "key": unique per registration}
CACHE_ENV = "STEERSERVE_IAPT_CACHE"  # env: adapters each worker keeps loaded (LRU)

_ENGINES: dict[int, IaptRows] = {}  # id(VllmConfig) -> that engine's rows
_STEP: list[RowWork] | None = None  # this forward's IAPT work; None: none
_STEP_ROWS: IaptRows | None = None  # the engine's rows that work came from
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
    instruction: slice  # empty if none in this step
    soft: slice
    first_slot: int  # the soft slot (0..3) of the first soft token in `soft`


def extra_args(path: Path, key: str | None = None) -> dict:
    """What a request's SamplingParams.extra_args carry for its IAPT adapter; `key` names this registration of
    it in the workers' caches (default: the path)."""
    return {ARGS_KEY: {"path": str(path), "key": key or str(path)}}


def write_probe_adapter(path: Path, hidden_size: int, num_layers: int) -> None:
    """A random adapter whose soft tokens are far from anything the model has seen: the start-up self-test."""
    model = IaptModel(IaptConfig("self-test", hidden_size, num_layers, bottleneck=8))
    with torch.no_grad():
        model.tensor("up.bias").normal_(0, 10.0, generator=torch.Generator().manual_seed(0))
    model.save(path)


def load(args: dict, device: torch.device) -> IaptModel:
    """The adapter a request's `extra_args[ARGS_KEY]` names, from this worker's LRU of loaded adapters."""
    key = args.get("key") or args["path"]
    model = _MODELS.get(key)
    if model is None:
        model = _MODELS[key] = IaptModel.load(Path(args["path"]), device)
        while len(_MODELS) > max(1, int(os.environ.get(CACHE_ENV, "8"))):
            _MODELS.popitem(last=False)
    _MODELS.move_to_end(key)
    return model


class IaptRows:
    """The IAPT rows of one engine's persistent batch, set by the steering processor when the batch changes."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, IaptRow]] = []
        self.off: str | None = None  # why IAPT is switched off in this engine (None: it is on)

    def switch_off(self, reason: str) -> None:
        """A step could not apply its adapters: no more IAPT in this engine (server/engine/faults.py)."""
        if self.off is None:
            self.off = reason
            faults.report("iapt", reason)

    @staticmethod
    def for_engine(vllm_config) -> IaptRows:
        return _ENGINES.setdefault(id(vllm_config), IaptRows())

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
            out.append(RowWork(row, slice(a, a + max(0, ins_end - first)),
                               slice(a + soft_start - first, a + max(soft_start, soft_end) - first), soft_start - n))
        return out


def _begin_step(runner, positions):
    """Step hook: this forward's IAPT work for the layer hooks (attached to the model on first use)."""
    global _STEP, _STEP_ROWS
    rows = _ENGINES.get(id(vllm_compat.runner_config(runner)))
    if rows is None or not rows.rows or rows.off:
        return None
    try:
        work = rows.work(step.row_starts(runner), positions.cpu())
        if work:
            _attach(vllm_compat.runner_model(runner))
    except Exception as exc:  # noqa: BLE001 - never kill the engine: switch the method off, report why
        rows.switch_off(f"{type(exc).__name__}: {exc}")
        return None
    if not work:
        return None
    _STEP, _STEP_ROWS = work, rows

    def done() -> None:
        global _STEP, _STEP_ROWS
        _STEP = _STEP_ROWS = None
    return done


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
        global _STEP
        work = _STEP
        if work is None:
            return None
        try:
            return _apply(layer, work, args)
        except Exception as exc:  # noqa: BLE001 - never kill the engine: switch the method off, report why
            if _STEP_ROWS is not None:
                _STEP_ROWS.switch_off(f"{type(exc).__name__}: {exc}")
            _STEP = None  # the later layers of this forward too
            return None
    return pre


def _apply(layer: int, work: list[RowWork], args: tuple):
    """Fold this layer's instruction tokens into their rows' pools; overwrite the soft tokens (new args or None)."""
    positions, hidden, residual, *rest = args
    soft = [w for w in work if w.soft.start < w.soft.stop]
    if soft:
        hidden = hidden.clone()
        residual = residual.clone() if residual is not None else None
    for w in work:
        if w.instruction.start < w.instruction.stop:
            stream = hidden[w.instruction] if residual is None else hidden[w.instruction] + residual[w.instruction]
            w.row.pools[layer] = merge_pools(w.row.pools.get(layer), w.row.model.pool_partial(layer, stream))
    for w in soft:
        p = w.row.model.finish(layer, w.row.pools[layer])
        count = w.soft.stop - w.soft.start
        hidden[w.soft] = p[w.first_slot:w.first_slot + count].to(hidden.dtype)
        if residual is not None:
            residual[w.soft] = 0
    if not soft:
        return None
    LAYER_CALLS[0] += 1
    return (positions, hidden, residual, *rest)


def register() -> None:
    step.add(_begin_step)


def unregister() -> None:
    step.remove(_begin_step)
