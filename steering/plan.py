"""The compiled per-request plan: what the server sends to the vLLM workers in `SamplingParams.extra_args`.

A plan holds only flat, already validated numbers (token ids, gains), never user text. The server builds it
(`steering.compile`), the worker-side processors read it (`server/engine/processor.py`). Keep both sides on this module.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

EXTRA_ARGS_KEY = "steerserve"
ATTENTION_MODES = ("softmax", "lssa", "lssar", "reweight")
PLAN_VERSION = 1


@dataclass(frozen=True)
class EosRamp:
    """Add `max * t / window` to every end-of-sequence logit, t = tokens generated so far; from t >= window on,
    the bias stays at `max` (the paper's intent; the reference code drops it to 0 there)."""

    token_ids: tuple[int, ...]
    max: float
    window: int

    def bias(self, generated: int) -> float:
        return self.max * min(generated, self.window) / self.window


@dataclass(frozen=True)
class LogitsPlan:
    """Logits-level steering of one request. `bias` merges the plain logit bias and the rules' constant token
    deltas (both are additive constants); `diversity` is subtracted once from every distinct token id already
    generated in this response (prompt tokens do not count)."""

    bias_ids: tuple[int, ...] = ()
    bias_values: tuple[float, ...] = ()
    eos_ramp: EosRamp | None = None
    diversity: float = 0.0

    def is_noop(self) -> bool:
        return not self.bias_ids and self.eos_ramp is None and self.diversity == 0.0


@dataclass(frozen=True)
class SpanBias:
    """`log_alpha` added to the scores of every prompt key outside `targets` (half-open key index ranges), for
    the query heads `heads` of the decoder layers `layers`. The worker takes the complement with the row's own
    prompt length; generated keys are never biased."""

    targets: tuple[tuple[int, int], ...]
    log_alpha: float
    layers: tuple[int, ...]
    heads: tuple[int, ...]


@dataclass(frozen=True)
class AttentionPlan:
    """Attention steering of one request: additive log-biases on chosen keys, per (layer, query head).
    `sink_log_gains` is empty or a dense row-major [layers x heads] table added to key 0's score (ln gamma)."""

    sink_log_gains: tuple[float, ...] = ()
    spans: tuple[SpanBias, ...] = ()
    mode: str = "softmax"  # the attention function in `mode_layers`: softmax, lssa, lssar or reweight
    power: float = 15.0  # the re-weighting exponent p (lssar, reweight)
    mode_layers: tuple[int, ...] = ()

    def is_noop(self) -> bool:
        return not any(self.sink_log_gains) and not self.spans and (self.mode == "softmax" or not self.mode_layers)


@dataclass(frozen=True)
class ExpertsPlan:
    """MoE expert steering of one request (steering/experts.py): (decoder layer, expert) pairs switched off and
    forced on, their modes, and whether only generated tokens (positions >= prompt length) are steered."""

    off: tuple[tuple[int, int], ...] = ()
    on: tuple[tuple[int, int], ...] = ()
    off_drop: bool = False
    on_dominant: bool = False
    generation_only: bool = False

    def is_noop(self) -> bool:
        return not self.off and not self.on


@dataclass(frozen=True)
class Plan:
    fingerprint: str
    logits: LogitsPlan = field(default_factory=LogitsPlan)
    attention: AttentionPlan = field(default_factory=AttentionPlan)
    experts: ExpertsPlan = field(default_factory=ExpertsPlan)

    def to_extra_args(self) -> dict[str, Any]:
        return {EXTRA_ARGS_KEY: {"v": PLAN_VERSION, **asdict(self)}}

    @staticmethod
    def from_extra_args(extra_args: dict[str, Any] | None) -> Plan | None:
        """The plan in a request's extra_args, or None if it carries none. Raises ValueError if malformed."""
        raw = (extra_args or {}).get(EXTRA_ARGS_KEY)
        if raw is None:
            return None
        if not isinstance(raw, dict) or raw.get("v") != PLAN_VERSION:
            raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}] is not a version-{PLAN_VERSION} steerserve plan")
        lg = raw.get("logits") or {}
        ramp = lg.get("eos_ramp")
        logits = LogitsPlan(
            bias_ids=tuple(int(i) for i in lg.get("bias_ids", ())),
            bias_values=tuple(float(v) for v in lg.get("bias_values", ())),
            eos_ramp=EosRamp(tuple(int(i) for i in ramp["token_ids"]), float(ramp["max"]), int(ramp["window"]))
            if ramp else None,
            diversity=float(lg.get("diversity", 0.0)),
        )
        at = raw.get("attention") or {}
        attention = AttentionPlan(
            sink_log_gains=tuple(float(g) for g in at.get("sink_log_gains", ())),
            spans=tuple(SpanBias(tuple((int(a), int(b)) for a, b in sp["targets"]), float(sp["log_alpha"]),
                                 tuple(int(x) for x in sp["layers"]), tuple(int(x) for x in sp["heads"]))
                        for sp in at.get("spans", ())),
            mode=str(at.get("mode", "softmax")), power=float(at.get("power", 15.0)),
            mode_layers=tuple(int(x) for x in at.get("mode_layers", ())),
        )
        ex = raw.get("experts") or {}
        experts = ExpertsPlan(
            off=tuple((int(a), int(b)) for a, b in ex.get("off", ())),
            on=tuple((int(a), int(b)) for a, b in ex.get("on", ())),
            off_drop=bool(ex.get("off_drop", False)), on_dominant=bool(ex.get("on_dominant", False)),
            generation_only=bool(ex.get("generation_only", False)),
        )
        _check(logits)
        _check_attention(attention)
        if any(a < 0 or b < 0 for a, b in (*experts.off, *experts.on)):
            raise ValueError("plan: negative expert index")
        return Plan(fingerprint=str(raw.get("fingerprint", "")), logits=logits, attention=attention,
                    experts=experts)


def _check_attention(at: AttentionPlan) -> None:
    if at.mode not in ATTENTION_MODES or not 1.0 <= at.power <= 64.0:
        raise ValueError(f"plan: unknown attention mode {at.mode!r} or power {at.power} out of [1, 64]")
    numbers = [*at.sink_log_gains, *(sp.log_alpha for sp in at.spans)]
    if not all(math.isfinite(x) for x in numbers):
        raise ValueError("plan: non-finite attention bias")
    if any(a < 0 or b <= a for sp in at.spans for a, b in sp.targets):
        raise ValueError("plan: span targets must be non-empty ranges of non-negative key indices")


def _check(lg: LogitsPlan) -> None:
    if len(lg.bias_ids) != len(lg.bias_values):
        raise ValueError("plan: bias_ids and bias_values differ in length")
    numbers = [*lg.bias_values, lg.diversity] + ([lg.eos_ramp.max] if lg.eos_ramp else [])
    if not all(math.isfinite(x) for x in numbers):
        raise ValueError("plan: non-finite value")
    if lg.eos_ramp is not None and (lg.eos_ramp.window < 1 or not lg.eos_ramp.token_ids):
        raise ValueError("plan: eos_ramp needs a window >= 1 and at least one token id")
