"""One APIRouter per resource; `ROUTERS` is what the app includes, in this order."""
from __future__ import annotations

from . import adapters, health, openai, steering, tenants, vectors

ROUTERS = (health.router, openai.router, steering.router, adapters.router, tenants.router, vectors.router)
