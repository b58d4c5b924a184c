"""One APIRouter per resource; `ROUTERS` is what the app includes, in this order."""
from __future__ import annotations

from . import adapters, health, openai, responses, steering, tenants, tokenize

ROUTERS = (health.router, openai.router, responses.router, tokenize.router, steering.router, adapters.router,
           tenants.router)
