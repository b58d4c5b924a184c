"""What a steering method is, as the server and the engine see it: one `Method` per family, registered in
steering/methods/__init__.py (`METHODS`). Everything per-method lives on it, so the spec, the plan codec, the
prefix-cache salt, the model checks and the start-up self-tests are loops over the registry."""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ..model import ModelFacts, SpecError
from ..plan import Plan, PlanPart

FirstToken = Callable[..., Awaitable[tuple[int, float]]]


@dataclass(frozen=True)
class Probe:
    """What a start-up self-test gets: the model's facts, its hidden size, and `first_token(prompt_ids, plan=None)`
    (the greedy first token and its logprob of a one-token request, steered by `plan`)."""

    facts: ModelFacts
    hidden_size: int
    first_token: FirstToken


def all_names(value: dict[str, Any]) -> list[str]:
    return list(value)


@dataclass(frozen=True)
class Method:
    """One steering method family.

    family: its key in the spec (`steering.<family>`) and in the plan (`parts.<family>`).
    spec: its spec model (a `Strict` pydantic model), or None when no spec asks for it (an IAPT adapter, the
        routed-expert counts: the server adds their parts itself).
    description: the spec field's description in the published schema (None: none).
    part: its plan part (a `PlanPart`), or None when it runs in the server (prompt-level methods). Whether it
        enters the prefix-cache salt is the part's `HIDDEN_STATE`.
    compile: `(spec, facts, field) -> part`; raises `SpecError(field, reason)` (a 400) for what it cannot do.
    names: the method names `X-Steering-Applied` lists for a spec value (`family.<name>`), default its keys.
    label: how errors name it ("attention steering").
    facts: `(hf_text_config, vllm model_config) -> dict` of `ModelFacts` fields it needs read off the model,
        including a static reason in `unsupported` (e.g. MLA attention).
    available: whether the model has what it steers at all (experts: a MoE model); no self-test otherwise.
    self_test: the start-up probe: `await self_test(probe)` is True when steering moved the output. A method
        whose probe fails is switched off (`ModelFacts.unsupported[family]`), or, if `required`, the server
        refuses to serve.
    """

    family: str
    spec: type | None = None
    description: str | None = None
    part: type[PlanPart] | None = None
    compile: Callable[[Any, ModelFacts, str], PlanPart] | None = None
    names: Callable[[dict[str, Any]], list[str]] = all_names
    label: str = ""
    facts: Callable[[Any, Any], dict[str, Any]] | None = None
    available: Callable[[ModelFacts], bool] = lambda facts: True
    self_test: Callable[[Probe], Awaitable[bool]] | None = None
    required: bool = False

    def check(self, model: ModelFacts, field: str) -> None:
        """The 400 for a spec this model cannot apply: the method was switched off (model or self-test)."""
        reason = model.unsupported.get(self.family)
        if reason:
            raise SpecError(field, f"{self.label or self.family} is not available on this model: {reason}")

    def compile_part(self, spec: Any, model: ModelFacts, field: str) -> PlanPart:
        self.check(model, field)
        assert self.compile is not None
        return self.compile(spec, model, field)


PROBE_IDS = list(range(1, 9))  # the self-tests' prompt: eight ordinary tokens


async def moves(probe: Probe, plan: Plan, ids: list[int] = PROBE_IDS) -> bool:
    """Whether `plan` changes the first token (or its logprob) of `ids`."""
    return await probe.first_token(ids) != await probe.first_token(ids, plan)
