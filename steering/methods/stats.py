"""Routed-expert counts (`steering_stats.routed_experts`): a plan part the server adds when a request asks for
them; the experts engine hook (server/engine/router_hook.py) counts. Not a steering method: it changes nothing."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..plan import PlanPart
from .base import Method


@dataclass(frozen=True)
class StatsPlan(PlanPart):
    """`key`: where the workers publish this request's counts (server/engine/router_hook.py `read_counts`)."""

    FAMILY: ClassVar[str] = "stats"

    key: str = ""

    def is_noop(self) -> bool:
        return not self.key

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> StatsPlan:
        return cls(str(raw.get("key") or ""))


METHOD = Method("stats", part=StatsPlan, label="routed-expert counts")
