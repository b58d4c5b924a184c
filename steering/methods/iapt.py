"""IAPT adapters (instruction-aware soft prompts): a plan part the server adds for an IAPT adapter (no spec), and
the start-up self-test. The math is steering/iapt.py, the engine side server/engine/iapt_hook.py."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..iapt import PLACEHOLDER_ID, SOFT_TOKENS, IaptConfig, IaptModel
from ..plan import Plan, PlanPart
from .base import PROBE_IDS, Method, Probe, moves


@dataclass(frozen=True)
class IaptPlan(PlanPart):
    """The request's IAPT adapter: its directory, and `key`, unique per registration of it (the workers' cache
    key). Its soft tokens change hidden states, and a cached block holds no hidden states for the pooling, so an
    IAPT request never reads the prefix cache (`READS_PREFIX_CACHE`)."""

    FAMILY: ClassVar[str] = "iapt"
    HIDDEN_STATE: ClassVar[bool] = True
    READS_PREFIX_CACHE: ClassVar[bool] = False

    path: str = ""
    key: str = ""

    def is_noop(self) -> bool:
        return not self.path

    def salt_key(self, prompt_len: int) -> Any:
        return self.key or self.path

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> IaptPlan:
        if not isinstance(raw.get("path"), str) or not isinstance(raw.get("key", ""), str):
            raise ValueError("plan: the iapt part needs {'path': str, 'key': str}")
        return cls(raw["path"], raw.get("key") or raw["path"])


def write_probe_adapter(path: Path, hidden_size: int, num_layers: int) -> None:
    """A random adapter whose soft tokens are far from anything the model has seen: the start-up self-test."""
    model = IaptModel(IaptConfig("self-test", hidden_size, num_layers, bottleneck=8))
    with torch.no_grad():
        model.tensor("up.bias").normal_(0, 10.0, generator=torch.Generator().manual_seed(0))
    model.save(path)


async def self_test(probe: Probe) -> bool:
    """A random adapter with large soft states must change the output."""
    with tempfile.TemporaryDirectory(prefix="steerserve-iapt-probe-") as where:
        write_probe_adapter(Path(where), probe.hidden_size, probe.facts.num_layers)
        return await moves(probe, Plan("selftest", IaptPlan(where, where)), PROBE_IDS + [PLACEHOLDER_ID] * SOFT_TOKENS)


METHOD = Method("iapt", part=IaptPlan, label="IAPT", self_test=self_test)
