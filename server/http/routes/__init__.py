"""One APIRouter per resource; `ROUTERS` is what the app always includes, in this order (the playground's router,
`playground.router`, only when the setting is on)."""
from __future__ import annotations

from . import adapters, health, openai, steering, tenants

ROUTERS = (health.router, openai.router, steering.router, adapters.router, tenants.router)
