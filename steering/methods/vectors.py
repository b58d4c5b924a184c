"""Activation steering with control vectors (add, ablate): the method's registration. The spec, plan part and
compile are steering/vectors.py, the engine side server/engine/vectors_hook.py."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..control_vectors import ControlVector
from ..plan import Plan
from ..vectors import VectorData, VectorOp, Vectors, VectorsPlan, compile_vectors, names
from .base import Method, Probe, moves


def facts(hf: Any, model_config: Any) -> dict[str, Any]:
    """The hidden size (the length of every direction), under `ModelFacts.extra["vectors"]`."""
    return {"extra": {"vectors": {"hidden_size": int(hf.hidden_size)}}}


def probe_plan(hidden_size: int, num_layers: int) -> Plan:
    """The self-test's plan: a large random direction added to every token at the middle decoder layer."""
    layer = num_layers // 2
    v = np.random.default_rng(0).standard_normal(hidden_size).astype(np.float32)
    data = VectorData.of(ControlVector.of({layer: v}), (layer,))
    return Plan("selftest", VectorsPlan((data,), (VectorOp(0, (layer,), 100.0, normalize=True),)))


async def self_test(probe: Probe) -> bool:
    """A unit direction times 100 added at the middle layer must change the output."""
    return await moves(probe, probe_plan(probe.hidden_size, probe.facts.num_layers))


METHOD = Method("vectors", spec=Vectors, part=VectorsPlan, compile=compile_vectors, names=names,
                description="Control vectors, applied in order: add a direction to the residual stream at the "
                            "output of chosen decoder layers, or ablate it (docs/methods/vectors.md).",
                label="activation steering (vectors)", facts=facts, self_test=self_test)
