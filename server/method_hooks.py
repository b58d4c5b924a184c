"""The registry of engine hooks: one line per method that acts inside the engine (docs/internals.md, "Adding a
method"). Logits steering has no entry: the steering processor itself applies it (server/worker.py)."""
from __future__ import annotations

from . import attention, experts, iapt
from .engine_state import Hook

HOOKS: tuple[Hook, ...] = (attention.HOOK, experts.HOOK, iapt.HOOK)
