"""The registry of engine hooks: one line per method that acts inside the engine (docs/internals.md, "Adding a
method"). Logits steering has no entry: the steering processor itself applies it (server/engine/processor.py)."""
from __future__ import annotations

from . import attention_backend as attention
from . import iapt_hook as iapt
from . import router_hook as experts
from . import vectors_hook as vectors
from .state import Hook

HOOKS: tuple[Hook, ...] = (attention.HOOK, experts.HOOK, iapt.HOOK, vectors.HOOK)
