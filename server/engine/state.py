"""One engine's steering state in a worker process: the rows of every engine hook, this forward's per-method
work, and each method's `off` reason. Created in exactly one place (the steering processor's `__init__`,
server/engine/processor.py, keyed by the engine's `VllmConfig`) and dropped in exactly one (when that processor is
collected, or replaced by the next engine built on a config with the same id), so a new engine in the same
process starts with no rows and no method off, for every registered hook, by construction.

Engine hooks are registered in server/engine/hooks.py (`HOOKS`, which the processor passes in); each is a `Hook` with per-engine rows (a
`MethodRows`), and optionally per-step work: `_begin_step` runs around every forward (server/engine/forward_hook.py) and puts
each hook's work for this forward in `EngineState.step`, which the model-side hooks (router, layer pre-hooks) read
through `running()`; steps do not overlap within a worker process.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from . import faults, tp
from . import forward_hook as step

if TYPE_CHECKING:
    from steerserve.steering.plan import Plan

_STATES: dict[int, EngineState] = {}  # id(VllmConfig) -> that engine's state; one engine per config object
_RUNNING: list[EngineState | None] = [None]  # the engine whose forward runs now in this process


@dataclass(frozen=True)
class RowContext:
    """What the hooks need to turn a row's plan into its per-row state."""

    num_layers: int
    num_heads: int
    num_experts: int
    device: torch.device
    tp: tp.Rank = tp.Rank()  # this worker's tensor-parallel rank (server/engine/tp.py): what its hooks cut to


class MethodRows:
    """The rows of one engine's persistent batch that one hook steers, as `(batch row, row state)`, set by the
    steering processor whenever the batch changes (`changed` then rebuilds derived tables); and `off`, why the
    method is switched off in this engine (None: it is on)."""

    family = ""  # the method family, for fault reports

    def __init__(self) -> None:
        self._rows: list[tuple[int, Any]] = []
        self.off: str | None = None
        self.fail_rows: Callable[[str], None] | None = None  # under TP: fail the rows in flight (EngineState)

    @property
    def rows(self) -> list[tuple[int, Any]]:
        return self._rows

    @rows.setter
    def rows(self, rows: list[tuple[int, Any]]) -> None:
        self._rows = rows
        self.changed()

    def changed(self) -> None:
        """The rows changed (override to rebuild what is derived from them)."""

    def switch_off(self, reason: str) -> None:
        """The hook could not apply its method: no more of it in this engine (server/engine/faults.py)."""
        if self.off is None:
            self.off = reason
            faults.report(self.family, reason)
            if self.fail_rows is not None:
                self.fail_rows(reason)


@dataclass(frozen=True)
class Hook:
    """A method's engine side.

    family: the plan part it applies (steering/methods/).
    new_rows: a fresh, empty `MethodRows` for a new engine.
    admit: `(plan, prompt_len, ctx) -> row state` for a new row of the batch, or None if the plan gives it nothing.
    begin_step: `(rows, runner, positions) -> work` before a forward that has rows of this hook (None: nothing to
        do this step); an exception switches the method off. The work is in `EngineState.step[family]`.
    end_step: `(work) -> None` after that forward.
    register / unregister: install / remove the vLLM patches it needs, once per process (the plugin; tests).
    """

    family: str
    new_rows: Callable[[], MethodRows]
    admit: Callable[[Plan, int, RowContext], Any]
    begin_step: Callable[[MethodRows, Any, torch.Tensor], Any] | None = None
    end_step: Callable[[Any], None] | None = None
    register: Callable[[], None] = lambda: None
    unregister: Callable[[], None] = lambda: None


@dataclass(eq=False)
class EngineState:
    """Every hook's rows of one engine, and this forward's work by family (empty between forwards)."""

    hooks: tuple[Hook, ...]
    rows: dict[str, MethodRows] = field(init=False)
    step: dict[str, Any] = field(default_factory=dict)
    row_keys: dict[int, str | None] = field(default_factory=dict)  # batch row -> its request's key (the processor)

    def __post_init__(self) -> None:
        self.rows = {h.family: h.new_rows() for h in self.hooks}
        rank = tp.current()
        if rank.size > 1:  # the other ranks keep steering the rows in flight: they must not be served half-steered
            for family, rows in self.rows.items():
                rows.fail_rows = lambda reason, family=family: self._fail_in_flight(family, reason, rank)

    def _fail_in_flight(self, family: str, reason: str, rank: tp.Rank) -> None:
        """`family` was switched off on this rank only: report each of its keyed rows in flight as faulted, so
        the server fails their requests (server/engine/faults.py)."""
        for row, _ in self.rows[family].rows:
            if (key := self.row_keys.get(row)) is not None:
                faults.report_row(key, f"{family}: switched off on tensor-parallel rank {rank.rank}: {reason}")

    def fail_row(self, family: str, row: int, reason: str) -> None:
        """A hook's per-row work failed for batch row `row`: the fault is that row's request's (reported for the
        server, which fails the request; the row leaves the method's rows), or, with no key, the method's."""
        key = self.row_keys.get(row)
        if key is None:
            self.rows[family].switch_off(reason)
            return
        faults.report_row(key, f"{family}: {reason}")
        rows = self.rows[family]
        rows.rows = [(r, s) for r, s in rows.rows if r != row]

    def off(self) -> dict[str, str]:
        """The methods switched off in this engine: {family: reason}."""
        return {family: rows.off for family, rows in self.rows.items() if rows.off}


def create(vllm_config, owner: object, hooks: tuple[Hook, ...]) -> EngineState:
    """The one place an engine's state is made: a fresh state for `vllm_config`'s engine with the rows of every
    hook in `hooks` (server/engine/hooks.py), replacing any state a dead engine left under the same id; dropped
    when `owner` (the steering processor) is collected."""
    key, state = id(vllm_config), EngineState(hooks)
    _STATES[key] = state
    weakref.finalize(owner, _drop, key, state)
    return state


def _drop(key: int, state: EngineState) -> None:
    """The one place an engine's state goes (its owner was collected): unless a newer engine took the key."""
    if _STATES.get(key) is state:
        del _STATES[key]
    if _RUNNING[0] is state:
        _RUNNING[0] = None


def of(vllm_config) -> EngineState | None:
    """The state of `vllm_config`'s engine in this process (None before its processor exists)."""
    return _STATES.get(id(vllm_config))


def running() -> EngineState | None:
    """The engine whose forward is running in this process, if it has per-step work (the model-side hooks)."""
    return _RUNNING[0]


def _begin_step(runner, positions: torch.Tensor):
    """The step hook (server/engine/forward_hook.py): each hook's work for this forward; after it, each hook's `end_step`."""
    state = _STATES.get(id(runner.vllm_config))
    if state is None:
        return None
    for hook in state.hooks:
        rows = state.rows[hook.family]
        if hook.begin_step is None or not rows.rows or rows.off:
            continue
        try:
            work = hook.begin_step(rows, runner, positions)
        except Exception as exc:  # noqa: BLE001 - never kill the engine: switch the method off, report why
            rows.switch_off(f"{type(exc).__name__}: {exc}")
            continue
        if work is not None:
            state.step[hook.family] = work
    if not state.step:
        return None
    _RUNNING[0] = state

    def done() -> None:
        finished = dict(state.step)
        state.step.clear()
        _RUNNING[0] = None
        for hook in state.hooks:
            if hook.end_step is not None and hook.family in finished:
                try:
                    hook.end_step(finished[hook.family])
                except Exception as exc:  # noqa: BLE001 - never kill the engine: switch the method off, report why
                    state.rows[hook.family].switch_off(f"{type(exc).__name__}: {exc}")
    return done


def register() -> None:
    """Install the shared step hook, once per process (the plugin, after every engine hook's own `register`)."""
    step.add(_begin_step)


def unregister() -> None:
    """Undo `register` (tests: later engines in the process get plain vLLM)."""
    step.remove(_begin_step)
