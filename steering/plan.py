"""The compiled per-request plan: what the server sends to the vLLM workers in `SamplingParams.extra_args`.

A plan is one generic, versioned object: a fingerprint and one part per method that runs in the worker
(`logits`, `attention`, `experts`, `iapt`, `stats`; the registry is steering/methods/__init__.py). It travels
under one `extra_args` key:

    {"steerserve": {"v": 1, "fingerprint": "...", "parts": {"<family>": <the part's JSON>, ...}}}

Each part is a frozen dataclass of flat, already validated numbers (token ids, gains) and never user text; it
serialises itself (`to_json`), deserialises and checks itself (`from_json`, ValueError if malformed), and says
whether it changes hidden states (`HIDDEN_STATE`: it then enters the prefix-cache salt, `cache_salt`). The server
builds plans (`steering.spec.compile_spec`), the worker-side processor reads them (server/engine/processor.py).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

EXTRA_ARGS_KEY = "steerserve"
ATTENTION_MODES = ("softmax", "lssa", "lssar", "reweight")
PLAN_VERSION = 1


def digest(obj: Any) -> str:
    """A short stable hash of a JSON-able object (fingerprints, salts)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


_PART_TYPES: dict[str, type[PlanPart]] = {}  # every plan part class, by family (filled as they are defined)


class PlanPart:
    """One method's part of a plan. Subclasses are frozen dataclasses that set `FAMILY` (their key in the plan)
    and `HIDDEN_STATE`, and implement `from_json` (raise ValueError, TypeError or KeyError if malformed). A
    subclass registers itself when it is defined; steering/methods/ defines or imports every one."""

    FAMILY: ClassVar[str]
    HIDDEN_STATE: ClassVar[bool] = False  # True: the part changes the KV of a token sequence (enters the salt)
    READS_PREFIX_CACHE: ClassVar[bool] = True  # False: a request with this part must not read cached blocks

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if _PART_TYPES.setdefault(cls.FAMILY, cls) is not cls:
            raise TypeError(f"two plan parts for the family {cls.FAMILY!r}")

    def is_noop(self) -> bool:
        return False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> PlanPart:
        raise NotImplementedError

    def salt_key(self, prompt_len: int) -> Any:
        """What of this part enters the prefix-cache salt of a prompt of `prompt_len` tokens (hidden parts)."""
        return self.to_json()


def part_types() -> dict[str, type[PlanPart]]:
    """Every plan part defined so far, by family (importing steering.methods defines them all)."""
    return dict(_PART_TYPES)


class Plan:
    """A request's worker plan: its fingerprint and its parts by family. `plan.<family>` is that part, or the
    family's empty part when the plan has none (so `plan.attention.is_noop()` always works).

    `Plan(fingerprint, LogitsPlan(...), attention=AttentionPlan(...))`: parts positionally (by their FAMILY) or
    by family name."""

    def __init__(self, fingerprint: str, *parts: PlanPart, **named: PlanPart):
        self.fingerprint = fingerprint
        self.parts: dict[str, PlanPart] = {p.FAMILY: p for p in parts}
        for family, part in named.items():
            if part.FAMILY != family:
                raise TypeError(f"a {type(part).__name__} is the {part.FAMILY!r} part, not {family!r}")
            self.parts[family] = part

    def __getattr__(self, family: str) -> PlanPart:
        if family.startswith("_") or family in ("parts", "fingerprint"):
            raise AttributeError(family)
        part = self.__dict__["parts"].get(family)
        if part is not None:
            return part
        kind = _PART_TYPES.get(family)
        if kind is None:
            raise AttributeError(f"no plan part {family!r}")
        return kind()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Plan) and (self.fingerprint, self.parts) == (other.fingerprint, other.parts)

    def __repr__(self) -> str:
        return f"Plan({self.fingerprint!r}, {', '.join(f'{k}={v!r}' for k, v in self.parts.items())})"

    def with_part(self, part: PlanPart) -> Plan:
        """This plan with `part` added or replaced."""
        return Plan(self.fingerprint, *{**self.parts, part.FAMILY: part}.values())

    def is_noop(self) -> bool:
        return all(p.is_noop() for p in self.parts.values())

    def to_extra_args(self) -> dict[str, Any]:
        return {EXTRA_ARGS_KEY: {"v": PLAN_VERSION, "fingerprint": self.fingerprint,
                                 "parts": {family: part.to_json() for family, part in self.parts.items()}}}

    @staticmethod
    def from_extra_args(extra_args: dict[str, Any] | None) -> Plan | None:
        """The plan in a request's extra_args, or None if it carries none. Raises ValueError if malformed (also
        TypeError, KeyError or AttributeError for a part of the wrong shape: see `validate_params`)."""
        raw = (extra_args or {}).get(EXTRA_ARGS_KEY)
        if raw is None:
            return None
        if not isinstance(raw, dict) or raw.get("v") != PLAN_VERSION or not isinstance(raw.get("parts"), dict):
            raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}] is not a version-{PLAN_VERSION} steerserve plan")
        kinds = _PART_TYPES
        unknown = set(raw["parts"]) - set(kinds)
        if unknown:
            raise ValueError(f"plan: unknown parts {sorted(unknown)}")
        return Plan(str(raw.get("fingerprint", "")),
                    *(kinds[family].from_json(part or {}) for family, part in raw["parts"].items()))


def cache_salt(tenant: str, plan: Plan | None, prompt_len: int) -> str:
    """vLLM's prefix-cache salt of one prompt: tenants never share KV blocks, nor do requests whose hidden states
    differ (the plan's non-empty hidden-state parts: attention, experts, an IAPT adapter). Logits-only and
    prompt-only steering leave the KV of a token sequence alone, so they share blocks. The only salt function."""
    hidden = {family: part.salt_key(prompt_len) for family, part in (plan.parts if plan else {}).items()
              if part.HIDDEN_STATE and not part.is_noop()}
    return digest({"tenant": tenant, "hidden": hidden})


def finite(*numbers: float) -> bool:
    return all(math.isfinite(x) for x in numbers)


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
class LogitsPlan(PlanPart):
    """Logits-level steering of one request. `bias` merges the plain logit bias and the rules' constant token
    deltas (both are additive constants); `diversity` is subtracted once from every distinct token id already
    generated in this response (prompt tokens do not count)."""

    FAMILY: ClassVar[str] = "logits"

    bias_ids: tuple[int, ...] = ()
    bias_values: tuple[float, ...] = ()
    eos_ramp: EosRamp | None = None
    diversity: float = 0.0

    def is_noop(self) -> bool:
        return not self.bias_ids and self.eos_ramp is None and self.diversity == 0.0

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> LogitsPlan:
        ramp = raw.get("eos_ramp")
        lg = cls(bias_ids=tuple(int(i) for i in raw.get("bias_ids", ())),
                 bias_values=tuple(float(v) for v in raw.get("bias_values", ())),
                 eos_ramp=EosRamp(tuple(int(i) for i in ramp["token_ids"]), float(ramp["max"]), int(ramp["window"]))
                 if ramp else None,
                 diversity=float(raw.get("diversity", 0.0)))
        if len(lg.bias_ids) != len(lg.bias_values):
            raise ValueError("plan: bias_ids and bias_values differ in length")
        if not finite(*lg.bias_values, lg.diversity, *([lg.eos_ramp.max] if lg.eos_ramp else [])):
            raise ValueError("plan: non-finite value")
        if lg.eos_ramp is not None and (lg.eos_ramp.window < 1 or not lg.eos_ramp.token_ids):
            raise ValueError("plan: eos_ramp needs a window >= 1 and at least one token id")
        return lg


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
class AttentionPlan(PlanPart):
    """Attention steering of one request: additive log-biases on chosen keys, per (layer, query head).
    `sink_log_gains` is empty or a dense row-major [layers x heads] table added to key 0's score (ln gamma)."""

    FAMILY: ClassVar[str] = "attention"
    HIDDEN_STATE: ClassVar[bool] = True

    sink_log_gains: tuple[float, ...] = ()
    spans: tuple[SpanBias, ...] = ()
    mode: str = "softmax"  # the attention function in `mode_layers`: softmax, lssa, lssar or reweight
    power: float = 15.0  # the re-weighting exponent p (lssar, reweight)
    mode_layers: tuple[int, ...] = ()

    def is_noop(self) -> bool:
        return not any(self.sink_log_gains) and not self.spans and (self.mode == "softmax" or not self.mode_layers)

    def salt_key(self, prompt_len: int) -> Any:
        """Span steering biases prompt keys but not generated ones, so the same token at the same position may be
        biased in one request (a longer prompt) and not in another: with spans, the prompt length enters too."""
        return [self.to_json(), prompt_len] if self.spans else self.to_json()

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> AttentionPlan:
        at = cls(sink_log_gains=tuple(float(g) for g in raw.get("sink_log_gains", ())),
                 spans=tuple(SpanBias(tuple((int(a), int(b)) for a, b in sp["targets"]), float(sp["log_alpha"]),
                                      tuple(int(x) for x in sp["layers"]), tuple(int(x) for x in sp["heads"]))
                             for sp in raw.get("spans", ())),
                 mode=str(raw.get("mode", "softmax")), power=float(raw.get("power", 15.0)),
                 mode_layers=tuple(int(x) for x in raw.get("mode_layers", ())))
        if at.mode not in ATTENTION_MODES or not 1.0 <= at.power <= 64.0:
            raise ValueError(f"plan: unknown attention mode {at.mode!r} or power {at.power} out of [1, 64]")
        if not finite(*at.sink_log_gains, *(sp.log_alpha for sp in at.spans)):
            raise ValueError("plan: non-finite attention bias")
        if any(a < 0 or b <= a for sp in at.spans for a, b in sp.targets):
            raise ValueError("plan: span targets must be non-empty ranges of non-negative key indices")
        return at


@dataclass(frozen=True)
class ExpertsPlan(PlanPart):
    """MoE expert steering of one request (steering/experts.py): (decoder layer, expert) pairs switched off and
    forced on, their modes, and whether only generated tokens (positions >= prompt length) are steered."""

    FAMILY: ClassVar[str] = "experts"
    HIDDEN_STATE: ClassVar[bool] = True

    off: tuple[tuple[int, int], ...] = ()
    on: tuple[tuple[int, int], ...] = ()
    off_drop: bool = False
    on_dominant: bool = False
    generation_only: bool = False

    def is_noop(self) -> bool:
        return not self.off and not self.on

    def salt_key(self, prompt_len: int) -> Any:
        """Scope `generation` steers positions >= the prompt length only: like spans, the prompt length enters."""
        return [self.to_json(), prompt_len] if self.generation_only else self.to_json()

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ExpertsPlan:
        ex = cls(off=tuple((int(a), int(b)) for a, b in raw.get("off", ())),
                 on=tuple((int(a), int(b)) for a, b in raw.get("on", ())),
                 off_drop=bool(raw.get("off_drop", False)), on_dominant=bool(raw.get("on_dominant", False)),
                 generation_only=bool(raw.get("generation_only", False)))
        if any(a < 0 or b < 0 for a, b in (*ex.off, *ex.on)):
            raise ValueError("plan: negative expert index")
        return ex
