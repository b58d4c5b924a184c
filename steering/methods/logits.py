"""Logits steering (bias, rules): the method's registration. The math is steering/logits.py, the worker side
server/engine/processor.py (the logits processor itself applies it)."""
from __future__ import annotations

from ..logits import LogitsSpec, compile_logits
from ..plan import LogitsPlan, Plan
from .base import Method, Probe


async def self_test(probe: Probe) -> bool:
    """A +100 bias on one token must make it the probe's first token."""
    ids = [probe.facts.eos_token_ids[0] if probe.facts.eos_token_ids else 0]
    plain = (await probe.first_token(ids))[0]
    target = (plain + 1) % probe.facts.vocab_size
    steered = (await probe.first_token(ids, Plan("selftest", LogitsPlan(bias_ids=(target,), bias_values=(100.0,)))))
    return steered[0] == target


METHOD = Method("logits", spec=LogitsSpec, part=LogitsPlan, compile=compile_logits, label="logits steering",
                self_test=self_test, required=True)
