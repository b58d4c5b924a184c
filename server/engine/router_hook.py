"""MoE expert steering inside vLLM: per-row expert masks, the per-step token tables, and the router hook.

The steering processor (server/engine/processor.py) publishes each expert-steered row's masks whenever the batch changes
(`ExpertRows.rows`). Once per step, a step hook (server/engine/forward_hook.py, run after the step's inputs are prepared)
turns them into per-layer token tables from the runner's `query_start_loc` and the
step's positions ('generation' scope: positions >= the row's prompt length). The hook on vLLM's
`BaseRouter._select_experts`, the base of every router, then lets the router route all tokens as usual and
re-routes only the steered tokens with `steering.experts.steered_routing`, so unsteered tokens keep vLLM's routing
bit for bit. With no steered row in the step both wrappers are a dictionary lookup.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from steerserve.steering.experts import RouterConfig, steered_routing
from steerserve.steering.plan import ExpertsPlan

from . import forward_hook as step
from . import state as engine_state
from . import vllm_compat
from .state import Hook, MethodRows, RowContext

log = logging.getLogger("steerserve.experts")

STATS_DIR = "STEERSERVE_STATS_DIR"  # env: where workers write those counts for the server to read
HOOK_CALLS = [0]  # steered router calls in this process (for tests and diagnostics)


@dataclass(frozen=True)
class RowMasks:
    """One steered row: per decoder layer, its [E] off and on masks; its modes and prompt length. A row that asked
    for its routing statistics also carries `counts` ([decoder layers, E], experts selected for its tokens)."""

    layers: dict[int, tuple[torch.Tensor, torch.Tensor]]
    drop: bool
    dominant: bool
    generation_only: bool
    prompt_len: int
    stats_key: str = ""
    counts: torch.Tensor | None = field(default=None, compare=False)


def admit(plan, prompt_len: int, ctx: RowContext) -> RowMasks | None:
    """A new row's expert masks (and routed-expert counts, if its plan has a `stats` part), or None."""
    # Every rank routes alike (server/engine/tp.py): one rank counts, so the server sums each row once.
    stats_key = plan.stats.key if ctx.num_experts and ctx.tp.leads else ""
    if plan.experts.is_noop() and not stats_key:
        return None
    return row_masks(plan.experts, prompt_len, ctx.num_experts, stats_key, ctx.num_layers)


def row_masks(plan: ExpertsPlan, prompt_len: int, num_experts: int, stats_key: str = "",
              num_layers: int = 0) -> RowMasks:
    layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for pairs, which in ((plan.off, 0), (plan.on, 1)):
        for layer, expert in pairs:
            masks = layers.setdefault(layer, (torch.zeros(num_experts, dtype=torch.bool),
                                              torch.zeros(num_experts, dtype=torch.bool)))
            if expert < num_experts:
                masks[which][expert] = True
    counts = torch.zeros(num_layers, num_experts, dtype=torch.long) if stats_key else None
    return RowMasks(layers, plan.off_drop, plan.on_dominant, plan.generation_only, prompt_len, stats_key, counts)


@dataclass
class LayerTokens:
    """The steered tokens of one layer in one step: their indices in the step and their masks."""

    tokens: torch.Tensor  # [n] long
    off: torch.Tensor  # [n, E] bool
    on: torch.Tensor  # [n, E] bool
    drop: torch.Tensor  # [n] bool
    dominant: torch.Tensor  # [n] bool


@dataclass
class Step:
    """One forward's work for the router hook: steered tokens per decoder layer, and the rows whose routing is
    counted (all their tokens, in every MoE layer)."""

    layers: dict[int, LayerTokens]
    counted: list[tuple[torch.Tensor, RowMasks]]


class ExpertRows(MethodRows):
    """The expert-steered (or counted) rows of one engine's persistent batch. The processor sets `rows` whenever
    the batch changes; the per-layer mask stacks are built then, so a step only computes token indices."""

    family = "experts"

    def __init__(self) -> None:
        self._stacks: list[tuple[list[int], LayerStack]] = []  # per distinct set of rows, the layers they steer
        super().__init__()

    def changed(self) -> None:
        rows = self._rows
        by_rows: dict[tuple[int, ...], list[int]] = {}
        for layer in sorted({la for _, m in rows for la in m.layers}):
            key = tuple(i for i, (_, m) in enumerate(rows) if layer in m.layers)
            by_rows.setdefault(key, []).append(layer)
        self._stacks = []
        for key, layers in by_rows.items():
            mine = [rows[i] for i in key]
            self._stacks.append((layers, LayerStack(
                rows=torch.tensor([r for r, _ in mine]),
                off={la: torch.stack([m.layers[la][0] for _, m in mine]) for la in layers},
                on={la: torch.stack([m.layers[la][1] for _, m in mine]) for la in layers},
                drop=torch.tensor([m.drop for _, m in mine]), dominant=torch.tensor([m.dominant for _, m in mine]),
                first_steered=torch.tensor([m.prompt_len if m.generation_only else 0 for _, m in mine]))))

    def tables(self, qsl: list[int], positions: torch.Tensor) -> Step | None:
        n_rows = len(qsl) - 1
        counted = [(torch.arange(qsl[r], qsl[r + 1]), m) for r, m in self._rows
                   if m.counts is not None and r < n_rows and qsl[r + 1] > qsl[r]]
        out: dict[int, LayerTokens] = {}
        if self._stacks:
            starts_all = torch.tensor(qsl, dtype=torch.long)
            pos = positions.cpu()
        for layers, st in self._stacks:
            live = st.rows < n_rows
            idx = torch.nonzero(live).flatten()
            rows = st.rows[idx]
            starts, ends = starts_all[rows], starts_all[rows + 1]
            q = ends - starts
            which = torch.repeat_interleave(idx, q)  # for each token: its row's index in the stack
            offsets = torch.arange(int(q.sum())) - torch.repeat_interleave(torch.cumsum(q, 0) - q, q)
            tokens = torch.repeat_interleave(starts, q) + offsets
            keep = pos[tokens] >= st.first_steered[which]  # scope: generation steers positions >= prompt length
            if not bool(keep.all()):
                tokens, which = tokens[keep], which[keep]
            if not len(tokens):
                continue
            drop, dominant = st.drop[which], st.dominant[which]
            for la in layers:
                out[la] = LayerTokens(tokens, st.off[la][which], st.on[la][which], drop, dominant)
        if not out and not counted:
            return None
        return Step(out, counted)


@dataclass
class LayerStack:
    """Masks of the rows that steer the same layers, stacked when the batch changes."""

    rows: torch.Tensor  # [R] batch rows
    off: dict[int, torch.Tensor]  # layer -> [R, E]
    on: dict[int, torch.Tensor]
    drop: torch.Tensor  # [R]
    dominant: torch.Tensor
    first_steered: torch.Tensor  # [R] the first position steered: 0, or the prompt length for scope generation


def _router_config(router) -> RouterConfig:
    cfg = router.__dict__.get("_steerserve_config")  # on the router itself: ids are reused once it is freed
    if cfg is None:
        cfg = router._steerserve_config = _read_router_config(router)
    return cfg


def _read_router_config(router) -> RouterConfig:
    grouped = bool(getattr(router, "use_grouped_topk", False))
    return RouterConfig(
        top_k=router.top_k, renormalize=bool(getattr(router, "renormalize", True)),
        scoring=getattr(router, "scoring_func", "softmax"),
        correction_bias=getattr(router, "e_score_correction_bias", None),
        num_groups=router.num_expert_group if grouped else None, topk_groups=router.topk_group if grouped else None,
        scaling=float(getattr(router, "routed_scaling_factor", 1.0)))


def _layer_of(router) -> int | None:
    layer = router.__dict__.get("_steerserve_layer")
    if layer is None:
        for name, module in vllm_compat.forward_context_layers().items():
            if getattr(module, "router", None) is router:
                layer = router._steerserve_layer = vllm_compat.layer_index(name)
                break
    return layer


def _steered_select_experts(original):
    def select_experts(self, hidden_states, router_logits, topk_indices_dtype=None, **kwargs):
        weights, ids = original(self, hidden_states, router_logits, topk_indices_dtype, **kwargs)
        state = engine_state.running()
        tables = state.step.get("experts") if state is not None else None
        if tables is None:
            return weights, ids
        try:
            return _steer(self, tables, router_logits, weights, ids)
        except Exception as exc:  # noqa: BLE001 - never kill the engine: switch the method off, report why
            state.rows["experts"].switch_off(f"{type(exc).__name__}: {exc}")
            return original(self, hidden_states, router_logits, topk_indices_dtype, **kwargs)

    select_experts.__steerserve__ = True  # type: ignore[attr-defined]
    select_experts.__wrapped__ = original  # type: ignore[attr-defined]
    return select_experts


def _steer(router, tables: Step, router_logits, weights, ids):
    """The router hook's work: re-route this layer's steered tokens, count the counted rows' choices."""
    layer = _layer_of(router)
    if layer is None:
        return weights, ids
    lt = tables.layers.get(layer)
    if lt is not None:
        if getattr(router, "eplb_state", None) is not None or getattr(router, "custom_routing_function", None):
            raise RuntimeError("expert steering does not support this router (EPLB or a custom routing function)")
        keep = lt.tokens < router_logits.shape[0]
        tokens = lt.tokens[keep]
        w, i = steered_routing(router_logits[tokens], _router_config(router), lt.off[keep], lt.on[keep],
                               lt.drop[keep], lt.dominant[keep])
        weights[tokens] = w.to(weights.dtype)
        ids[tokens] = i.to(ids.dtype)
        HOOK_CALLS[0] += 1
    for tokens, m in tables.counted:
        if layer < m.counts.shape[0]:
            chosen = ids[tokens[tokens < ids.shape[0]]].flatten().long()
            m.counts[layer] += torch.bincount(chosen, minlength=m.counts.shape[1])[: m.counts.shape[1]]
    return weights, ids


def _begin_step(rows: ExpertRows, runner, positions) -> Step | None:
    """This forward's tables for the router hook (the engine hook's `begin_step`)."""
    return rows.tables(step.row_starts(runner), positions)


def _end_step(finished: Step) -> None:
    """After the forward: publish the counted rows' counts."""
    if finished.counted:
        _write_counts(finished.counted)


def _write_counts(counted: list[tuple[torch.Tensor, RowMasks]]) -> None:
    """Publish each counted row's running counts for the server (`read_counts`), atomically, after every step:
    the step that samples a request's last token has run its forward, so the file is complete by the time the
    server sees the request finish. One file per row (n > 1 gives one row per choice)."""
    where = os.environ.get(STATS_DIR)
    if not where:
        return
    for _, m in counted:
        path = Path(where) / f"{m.stats_key}-{id(m)}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(m.counts.tolist()))
        os.replace(tmp, path)


def read_counts(key: str, moe_layers: tuple[int, ...]) -> dict[str, list[int]]:
    """The summed routed-expert counts of one request's rows, per MoE decoder layer; the files are removed."""
    where = os.environ.get(STATS_DIR)
    total: dict[str, list[int]] = {}
    for path in sorted(Path(where).glob(f"{key}-*.json")) if where else ():
        counts = json.loads(path.read_text())
        path.unlink(missing_ok=True)
        for layer in moe_layers:
            row = counts[layer] if layer < len(counts) else []
            total[str(layer)] = [a + b for a, b in zip(total.get(str(layer), [0] * len(row)), row, strict=True)]
    return total


def register() -> None:
    """Install the router wrapper, once per process."""
    router = vllm_compat.router_class()
    original = getattr(router, vllm_compat.SELECT_EXPERTS)
    if not getattr(original, "__steerserve__", False):
        setattr(router, vllm_compat.SELECT_EXPERTS, _steered_select_experts(original))


def unregister() -> None:
    """Undo `register` (tests)."""
    router = vllm_compat.router_class()
    fn = router.__dict__[vllm_compat.SELECT_EXPERTS]
    if getattr(fn, "__steerserve__", False):
        setattr(router, vllm_compat.SELECT_EXPERTS, fn.__wrapped__)


HOOK = Hook("experts", ExpertRows, admit, _begin_step, _end_step, register, unregister)
