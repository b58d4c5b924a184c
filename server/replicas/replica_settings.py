"""The settings every replica gets, checked before anything of Ray starts (no Ray import here)."""
from __future__ import annotations

from ..settings import Settings


def prepare(settings: Settings) -> Settings:
    """The settings every replica gets: the checkpoint resolved here (fetched once, not by each replica), the
    key file and bind address checked as the single server checks them. Raises ValueError/OSError/ModelFetchError."""
    from ..http.auth import KeyStore, check_bind
    from ..models.store import resolve_model

    keys = KeyStore.load(settings.api_keys) if settings.api_keys else KeyStore.open()
    check_bind(settings.host, keys)
    model = resolve_model(settings.model, settings.cache)
    return settings.model_copy(update={"model": str(model), "replicas": settings.replicas or 1})
