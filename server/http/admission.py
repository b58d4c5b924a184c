"""Admission of generation requests: a global and a per-tenant bound on requests admitted and not finished, a
request deadline, and the drain on shutdown.

A generation route calls `Admission.admit(request, tenant)` before it does any work for the request. Over a bound
the request is refused at once with a 429 in OpenAI's rate-limit shape (`code: rate_limit_exceeded`) and a
`Retry-After` header; while the server drains (SIGTERM, server/cli/serve.py) it is a 503. An admitted request
holds a `Ticket` until its response has been sent in full (streamed bodies included) or the connection is gone:
`AdmissionMiddleware` wraps the whole ASGI call and releases the request's ticket in a `finally`, so no path
(client disconnect, cancellation, an exception while streaming) leaks a slot.

One tenant therefore cannot take more than `max_requests_per_tenant` slots of the `max_queued_requests` the engine
is given, and another tenant's request is admitted while the first floods. `Retry-After` is the recent mean
duration of a finished request, rounded up, between 1 and 60 s: about when a slot frees up.
"""
from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from dataclasses import dataclass, field

from starlette.requests import Request

from .errors import TooManyRequests, Unavailable

SCOPE_KEY = "steerserve.admission"  # the ASGI scope's list of this request's tickets


@dataclass(frozen=True)
class Limits:
    """The bounds (the settings of the same names): requests admitted and not finished, in all and per tenant,
    and the seconds one may take (None: no limit)."""

    max_queued_requests: int = 256
    max_requests_per_tenant: int = 64
    request_timeout: float | None = None


@dataclass(eq=False)
class Ticket:
    """One admitted request's slot; `release()` is idempotent."""

    admission: Admission
    tenant: str
    started: float = field(default_factory=time.monotonic)
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.admission._release(self)


class Admission:
    """Counts of admitted, unfinished generation requests, and the bounds on them. Used on the event loop only."""

    def __init__(self, limits: Limits | None = None):
        self.limits = limits or Limits()
        self.total = 0
        self.by_tenant: Counter[str] = Counter()
        self.refused = 0
        self.draining = False  # set on SIGTERM: no new requests
        self._mean_seconds = 1.0  # exponentially weighted mean duration of finished requests
        self._idle = asyncio.Event()
        self._idle.set()

    def admit(self, request: Request, tenant: str) -> Ticket:
        """A slot for `request` of `tenant`, released when its response is done; 429 over a bound, 503 while
        draining."""
        if self.draining:
            raise Unavailable("the server is shutting down; retry on another replica or after the restart",
                              code="shutting_down")
        lim = self.limits
        if self.by_tenant[tenant] >= lim.max_requests_per_tenant:
            self._refuse(f"tenant '{tenant}' has {self.by_tenant[tenant]} requests in progress, the most one "
                         f"tenant may have (max_requests_per_tenant={lim.max_requests_per_tenant})")
        if self.total >= lim.max_queued_requests:
            self._refuse(f"the server has {self.total} requests in progress, the most it admits "
                         f"(max_queued_requests={lim.max_queued_requests})")
        tickets = request.scope.get(SCOPE_KEY)
        if tickets is None:
            raise RuntimeError("AdmissionMiddleware is not installed")
        ticket = Ticket(self, tenant)
        self.total += 1
        self.by_tenant[tenant] += 1
        self._idle.clear()
        tickets.append(ticket)
        return ticket

    def retry_after(self) -> int:
        return max(1, min(60, math.ceil(self._mean_seconds)))

    def _refuse(self, why: str) -> None:
        self.refused += 1
        raise TooManyRequests(f"Rate limit reached: {why}. Retry after {self.retry_after()} s.", self.retry_after())

    def _release(self, ticket: Ticket) -> None:
        self.total -= 1
        self.by_tenant[ticket.tenant] -= 1
        if not self.by_tenant[ticket.tenant]:
            del self.by_tenant[ticket.tenant]
        self._mean_seconds += 0.2 * (time.monotonic() - ticket.started - self._mean_seconds)
        if not self.total:
            self._idle.set()

    async def drain(self, timeout: float) -> bool:
        """Stop admitting; wait up to `timeout` s for the admitted requests to finish. True if they all did."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True


class AdmissionMiddleware:
    """Gives every HTTP request a ticket list in its scope and releases what the route admitted once the whole
    response (a streamed body included) is sent or abandoned."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        tickets: list[Ticket] = []
        scope[SCOPE_KEY] = tickets
        try:
            await self.app(scope, receive, send)
        finally:
            for ticket in tickets:
                ticket.release()
