"""The registry of steering methods: one line per method (docs/internals.md, "Adding a method").

Order matters: it is the order of the spec's fields (and so of the published schema) and of the start-up
self-tests (logits first: without it the server refuses to serve)."""
from __future__ import annotations

from ..plan import PlanPart
from ..plan import part_types as plan_part_types
from . import attention, experts, iapt, logits, prompt, stats, vectors
from .base import Method, Probe

METHODS: tuple[Method, ...] = (logits.METHOD, attention.METHOD, experts.METHOD, prompt.METHOD, iapt.METHOD,
                               stats.METHOD, vectors.METHOD)

__all__ = ["METHODS", "Method", "Probe", "by_family", "part_types"]


def by_family() -> dict[str, Method]:
    return {m.family: m for m in METHODS}


def part_types() -> dict[str, type[PlanPart]]:
    """The plan part of every method that has one, by family."""
    parts = {m.family: m.part for m in METHODS if m.part is not None}
    assert parts == plan_part_types(), "every plan part belongs to exactly one registered method"
    return parts
