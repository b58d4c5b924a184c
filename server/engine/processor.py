"""Worker-side steering: per-row state of vLLM's persistent batch, and the logits-level steering methods.

`SteeringLogitsProcessor` is registered with the engine (`LLM(logits_processors=[...])`) and lives in the model
runner of every worker. vLLM calls its `update_state` before each step's forward (docs/internals.md),
so it is also where per-row state for every engine hook is set up (server/engine/hooks.py: attention, experts,
IAPT adapters), in the engine's one `EngineState` (server/engine/state.py), which it creates; `apply` then steers
the logits of that step. The per-request input is the `Plan` in `SamplingParams.extra_args` (steering/plan.py).

Logits rules (docs/methods/logits.md, with the EOS ramp held at its max past the window as plan.py specifies):
    logits[row] += bias                                    (plain bias and constant rule deltas, merged)
    logits[row, eos] += max * min(t, window) / window       (t = tokens generated so far)
    logits[row, w] -= diversity  for each distinct w generated so far in this response
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from steerserve.steering import methods  # noqa: F401 - defines every plan part the plans here may carry
from steerserve.steering.plan import EosRamp, Plan

from . import faults, tp
from . import state as engine_state
from .hooks import HOOKS
from .state import RowContext
from .vllm_compat import logits_processor_api

BatchUpdate, LogitsProcessor, MoveDirectionality = logits_processor_api()

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.config import VllmConfig


class RowBuffers:
    """Per-row tensors of vLLM's persistent batch plus one host-side record per row, kept in step with vLLM's
    row operations in one place, so a new kind of per-row state is one `new(...)` line.

    Invariant: a row whose record is None has all-zero tensors. It lets every operation skip rows that carry no
    steering, so unsteered traffic costs no tensor work at all.
    """

    def __init__(self, max_rows: int, device: torch.device):
        self.max_rows, self.device = max_rows, device
        self.records: list[Any] = [None] * max_rows
        self._tensors: list[torch.Tensor] = []

    def new(self, *shape: int, dtype: torch.dtype) -> torch.Tensor:
        """A zeroed `[max_rows, *shape]` tensor that follows the rows from now on."""
        t = torch.zeros((self.max_rows, *shape), dtype=dtype, device=self.device)
        self._tensors.append(t)
        return t

    def clear(self, i: int) -> bool:
        """Reset row i; True if it held anything."""
        if self.records[i] is None:
            return False
        for t in self._tensors:
            t[i] = 0
        self.records[i] = None
        return True

    def move(self, src: int, dst: int) -> bool:
        """Row src goes to dst (whatever dst held is dropped) and src becomes empty; True if anything changed."""
        if self.records[src] is None and self.records[dst] is None:
            return False
        for t in self._tensors:
            t[dst] = t[src]
            t[src] = 0
        self.records[dst], self.records[src] = self.records[src], None
        return True

    def swap(self, a: int, b: int) -> bool:
        if self.records[a] is None and self.records[b] is None:
            return False
        for t in self._tensors:
            t[[a, b]] = t[[b, a]]  # the right side is a gathered copy, so this is a safe swap
        self.records[a], self.records[b] = self.records[b], self.records[a]
        return True

    def replay(self, batch_update: BatchUpdate, install: Callable[[int, Any, int, list[int]], bool]) -> bool:
        """Replay one step's row operations in vLLM's required order: removed, added, moved. `install(i, params,
        prompt_len, output_tok_ids)` sets up an added row and says whether it holds anything; the row is cleared
        first, since
        an added row may reuse an index whose previous occupant never appears in `removed` (vLLM refills freed
        rows and drops them from `removed`). Returns True if any non-empty row was touched."""
        changed = False
        for i in batch_update.removed:
            changed |= self.clear(i)
        for i, params, prompt_ids, output_ids in batch_update.added:
            changed |= self.clear(i)
            changed |= install(i, params, len(prompt_ids or ()), output_ids)
        for src, dst, how in batch_update.moved:
            changed |= self.swap(src, dst) if how == MoveDirectionality.SWAP else self.move(src, dst)
        return changed


@dataclass
class _Row:
    """Host-side state of one steered row."""

    plan: Plan
    output_ids: list[int]  # vLLM's live list of this request's generated tokens (appended after each step)
    hooks: dict[str, Any]  # per engine hook that steers this row (family): its row state (`Hook.admit`)
    eos_ids: tuple[int, ...] = ()
    eos_ramp: EosRamp | None = None
    diversity: float = 0.0  # also in the `diversity` buffer; here so the per-step loop can skip rows cheaply
    consumed: int = 0  # how many of output_ids are already folded into `seen`/`bias`
    key: str | None = None  # the server's key for this row's request (server/engine/faults.py)


class SteeringLogitsProcessor(LogitsProcessor):
    """Per-row steering state for the persistent batch, and the logits rules of each row's plan.

    Rows without a plan, or whose plan steers no logits, are never written: their logits stay bit-identical.
    """

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool):
        self.device = torch.device(device)
        # The model's vocabulary (embedding rows), which vLLM trims the logits to; a tokenizer may have fewer.
        self.vocab = vllm_config.model_config.get_vocab_size()
        self.rows = RowBuffers(vllm_config.scheduler_config.max_num_seqs, self.device)
        # Dense additive bias: the plan's bias, minus `diversity` at every token already generated (folded in
        # as tokens arrive, so that `apply` is one gather-add for bias and diversity together).
        self.bias = self.rows.new(self.vocab, dtype=torch.float32)
        self.seen = self.rows.new(self.vocab, dtype=torch.bool)  # tokens already folded into `bias`
        self.diversity = self.rows.new(dtype=torch.float32)
        self.logits_active = self.rows.new(dtype=torch.bool)
        hf = vllm_config.model_config.hf_text_config
        self.context = RowContext(hf.num_hidden_layers, hf.num_attention_heads, _num_experts(hf), self.device,
                                  tp.current())
        # This engine's state, read by the engine hooks: made here, fresh, and dropped with this processor.
        self.state = engine_state.create(vllm_config, self, HOOKS)
        self.hook_active = {h.family: self.rows.new(dtype=torch.bool) for h in self.state.hooks}
        # Derived from the buffers above whenever the batch changes; read every step.
        self._active: list[int] = []
        self._active_idx = torch.zeros(0, dtype=torch.long, device=self.device)
        self._active_span: tuple[int, int] | None = None  # (lo, hi) when the steered rows are exactly lo..hi-1
        self._eos_rows = self._eos_cols = self._active_idx

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Reject malformed plans at the engine boundary (vLLM turns the ValueError into HTTP 400), so
        `update_state` in the worker never sees one."""
        try:
            Plan.from_extra_args(sampling_params.extra_args)
        except (TypeError, KeyError, AttributeError) as e:  # a wrong shape inside the plan dict
            raise ValueError(f"malformed steerserve plan in extra_args: {e!r}") from e

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None or not self.rows.replay(batch_update, self._admit):
            return
        # Only when a steered row was added, removed or moved: O(rows), not per step.
        size = batch_update.batch_size
        keys = {}
        for family, active in self.hook_active.items():
            rows = torch.nonzero(active[:size]).flatten().tolist()
            self.state.rows[family].rows = [(r, self.rows.records[r].hooks[family]) for r in rows]
            keys.update((r, self.rows.records[r].key) for r in rows)
        self.state.row_keys = keys
        self._active_idx = torch.nonzero(self.logits_active[:size]).flatten()
        self._active = self._active_idx.tolist()
        contiguous = bool(self._active) and self._active[-1] - self._active[0] + 1 == len(self._active)
        self._active_span = (self._active[0], self._active[-1] + 1) if contiguous else None
        rows, cols = [], []
        for r in self._active:
            rec: _Row = self.rows.records[r]
            rows += [r] * len(rec.eos_ids)
            cols += rec.eos_ids
        self._eos_rows = torch.tensor(rows, dtype=torch.long, device=self.device)
        self._eos_cols = torch.tensor(cols, dtype=torch.long, device=self.device)

    def _admit(self, i: int, params: SamplingParams | None, prompt_len: int, output_ids: list[int]) -> bool:
        """Set up row i's steering. A hook that cannot admit the row never raises (server/engine/faults.py): the
        fault is the row's when the server keyed its request (the row gets no steering, its request is reported
        and then failed by the server, before any of its output is handed out), else the method is switched off."""
        extra = params.extra_args if params is not None else None
        plan = Plan.from_extra_args(extra) or Plan("")
        key = faults.row_key(extra)
        hooks = {}
        for hook in self.state.hooks:
            try:
                state = hook.admit(plan, prompt_len, self.context)
            except Exception as exc:  # noqa: BLE001 - never kill the engine
                if key is not None:
                    faults.report_row(key, f"{hook.family}: {type(exc).__name__}: {exc}")
                    return False
                self.state.rows[hook.family].switch_off(f"{type(exc).__name__}: {exc}")
                continue
            if state is not None:
                hooks[hook.family] = state
        if not hooks and plan.logits.is_noop():
            return False
        rec = self.rows.records[i] = _Row(plan, output_ids, hooks, key=key)
        for family in hooks:
            self.hook_active[family][i] = True
        if not plan.logits.is_noop():
            self._install_logits(i, rec)
        return True

    def _install_logits(self, i: int, rec: _Row) -> None:
        lg = rec.plan.logits
        in_vocab = [(t, v) for t, v in zip(lg.bias_ids, lg.bias_values, strict=True) if 0 <= t < self.vocab]
        if in_vocab:
            ids, values = zip(*in_vocab, strict=True)
            self.bias[i].index_put_((torch.tensor(ids, device=self.device),),
                                    torch.tensor(values, dtype=torch.float32, device=self.device), accumulate=True)
        self.diversity[i] = lg.diversity
        self.logits_active[i] = True
        ramp = lg.eos_ramp
        rec.eos_ids = tuple(dict.fromkeys(t for t in ramp.token_ids if 0 <= t < self.vocab)) if ramp else ()
        rec.eos_ramp, rec.diversity, rec.consumed = ramp if rec.eos_ids else None, lg.diversity, 0

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self._active:
            return logits
        ramp = self._catch_up()
        width = min(logits.shape[1], self.vocab)  # equal in vLLM, which trims padded vocab rows off the logits
        # Only steered rows are written; the others are not touched, not even by a +0.0. Both branches compute
        # the same fp32 sum per row; the slice just skips the gather (twice as fast for a full batch on CPU).
        if self._active_span is not None:
            lo, hi = self._active_span
            logits[lo:hi, :width].add_(self.bias[lo:hi, :width])
        else:
            idx = self._active_idx
            logits[:, :width].index_add_(0, idx, self.bias.index_select(0, idx)[:, :width])
        if ramp:
            logits.index_put_((self._eos_rows, self._eos_cols),
                              torch.tensor(ramp, dtype=logits.dtype, device=logits.device), accumulate=True)
        return logits

    def _catch_up(self) -> list[float]:
        """Fold tokens generated since the last step into `bias` (diversity) and return this step's EOS-ramp
        values, aligned with `_eos_rows`. Runs in `apply`, not `update_state`: with async scheduling vLLM only
        replaces the previous step's placeholder ids (-1) just before sampling."""
        new_rows: list[int] = []
        new_tokens: list[int] = []
        ramp: list[float] = []
        for r in self._active:
            rec: _Row = self.rows.records[r]
            out = rec.output_ids
            n = len(out)
            if n < rec.consumed:  # vLLM took tokens back (e.g. a failed KV load): redo its logits from scratch
                self.bias[r], self.seen[r] = 0, False
                self._install_logits(r, rec)
            if n > rec.consumed:
                fresh = out[rec.consumed:n]
                if min(fresh) < 0:  # stop at the first placeholder; it is folded once vLLM fills it in
                    fresh = fresh[: next(k for k, t in enumerate(fresh) if t < 0)]
                rec.consumed += len(fresh)
                if rec.diversity:
                    if len(fresh) > 1:  # several at once (e.g. a resumed request): each distinct token once
                        fresh = list(dict.fromkeys(fresh))
                    fresh = [t for t in fresh if t < self.vocab]
                    new_rows += [r] * len(fresh)
                    new_tokens += fresh
            if rec.eos_ramp is not None:
                ramp += [rec.eos_ramp.bias(n)] * len(rec.eos_ids)
        if new_tokens:
            self._fold_diversity(new_rows, new_tokens)
        return ramp

    def _fold_diversity(self, rows: list[int], tokens: list[int]) -> None:
        """Subtract each row's diversity at each of its new tokens not seen before; (row, token) pairs are
        distinct. Vectorised: a token already seen gets -0.0, which leaves the bias bit-identical."""
        r = torch.tensor(rows, dtype=torch.long, device=self.device)
        t = torch.tensor(tokens, dtype=torch.long, device=self.device)
        first_time = self.seen[r, t].logical_not_()
        self.seen[r, t] = True
        self.bias.index_put_((r, t), self.diversity[r].neg_().mul_(first_time), accumulate=True)


def _num_experts(hf) -> int:
    """Routed experts per MoE layer of a HF text config (0 for a dense model)."""
    from steerserve.steering.experts import moe_layout

    layout = moe_layout(hf)
    return layout.num_experts if layout else 0
