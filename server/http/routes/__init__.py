"""One APIRouter per resource; `ROUTERS` is what the app always includes, in this order (the playground's router,
`playground.router`, only when the setting is on)."""
from __future__ import annotations

from . import adapters, health, openai, responses, steering, tenants, tokenize, vectors

ROUTERS = (health.router, openai.router, responses.router, tokenize.router, steering.router, adapters.router,
           tenants.router, vectors.router)
