"""Prometheus metrics: one registry per app, HTTP-level series from an ASGI middleware, token-level from generation."""
from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.routing import Match, Router

MAX_ADAPTER_LABELS = 64  # distinct adapter names with their own series; the rest count under OTHER
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


OTHER = "other"  # the label of what is not given its own series (unknown paths, adapters past the cap)


class Metrics:
    def __init__(self, unfinished_requests: Callable[[], int] = lambda: 0):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("steerserve_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=r)
        self.latency = Histogram("steerserve_request_latency_seconds", "Whole request time, body included",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("steerserve_requests_in_flight", "HTTP requests being served", ["route"], registry=r)
        self.ttft = Histogram("steerserve_time_to_first_token_seconds", "Arrival to first generated token",
                              ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("steerserve_inter_token_latency_seconds", "Time between a request's token deliveries",
                             ["route"], buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("steerserve_prompt_tokens", "Prompt tokens processed", ["route"], registry=r)
        self.generation_tokens = Counter("steerserve_generation_tokens", "Tokens generated", ["route"], registry=r)
        unfinished = Gauge("steerserve_engine_unfinished_requests", "Requests the vLLM engine still holds",
                           registry=r)
        unfinished.set_function(unfinished_requests)
        # Adapter pool (server/adapters/pool.py says what loads and evictions can and cannot see).
        self.adapter_requests = Counter("steerserve_adapter_requests", "Generation requests by adapter, its scope "
                                        f"and the requesting tenant (at most {MAX_ADAPTER_LABELS} adapter names, the "
                                        f"rest as '{OTHER}'; a deleted adapter's series go)",
                                        ["adapter", "scope", "tenant"], registry=r)
        self._adapter_series: dict[str, set[tuple[str, str, str]]] = {}  # adapter label -> its label sets
        self.adapter_loads = Counter("steerserve_adapter_loads", "Adapters loaded into the engine", registry=r)
        self.adapter_evictions = Counter("steerserve_adapter_evictions", "Adapters the engine's LRU dropped from "
                                         "its CPU cache", registry=r)
        self.adapter_load_seconds = Histogram("steerserve_adapter_load_seconds", "Time to load a cold adapter",
                                              buckets=LATENCY_BUCKETS, registry=r)
        self._pool = None
        Gauge("steerserve_adapters_loaded", "Adapters resident in the engine (CPU cache, up to max_cpu_loras)",
              registry=r).set_function(lambda: self._pool.loaded() if self._pool else 0)
        Gauge("steerserve_adapters_active", "Adapters with requests in flight", registry=r).set_function(
            lambda: self._pool.active() if self._pool else 0)
        r.register(_LoraRequestsInfo(self))
        # Per tenant and per steering method (tenants are bounded by the key file; families by the registry).
        self.tenant_requests = Counter("steerserve_tenant_requests", "Generation requests admitted, by tenant and "
                                       "whether they are steered", ["tenant", "steered"], registry=r)
        self.family_requests = Counter("steerserve_steering_requests", "Generation requests admitted, by steering "
                                       "method family (a request with several families counts in each)",
                                       ["family"], registry=r)
        self.tenant_tokens = Counter("steerserve_tenant_tokens", "Prompt and generated tokens by tenant",
                                     ["tenant", "kind"], registry=r)
        self.decode_per_token = Histogram("steerserve_decode_seconds_per_token", "An engine request's time from its "
                                          "first to its last token, per token after the first; steered / unsteered "
                                          "is the steering overhead", ["steered"], buckets=TOKEN_LATENCY_BUCKETS,
                                          registry=r)

    def count_request(self, tenant: str, families: list[str]) -> None:
        """One admitted generation request of `tenant`, steered by these method families (none: unsteered)."""
        self.tenant_requests.labels(tenant, "true" if families else "false").inc()
        for family in families:
            self.family_requests.labels(family).inc()

    def bind_pool(self, pool) -> None:
        self._pool = pool

    def count_adapter_request(self, adapter: str, scope: str, tenant: str) -> None:
        """One request for `adapter`; a name beyond the first MAX_ADAPTER_LABELS with series counts as OTHER."""
        named = len(self._adapter_series) - (OTHER in self._adapter_series)
        if adapter not in self._adapter_series and named >= MAX_ADAPTER_LABELS:
            adapter = OTHER
        self._adapter_series.setdefault(adapter, set()).add((adapter, scope, tenant))
        self.adapter_requests.labels(adapter, scope, tenant).inc()

    def forget_adapter(self, adapter: str, scope: str, owner: str) -> None:
        """Drop the series of a deleted adapter (`owner`: its tenant; a global adapter's series of every tenant)."""
        labels = self._adapter_series.get(adapter, set())
        gone = {key for key in labels if key[1] == scope and (scope == "global" or key[2] == owner)}
        for key in gone:
            self.adapter_requests.remove(*key)
        labels -= gone
        if not labels:
            self._adapter_series.pop(adapter, None)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _LoraRequestsInfo:
    """vLLM's `vllm:lora_requests_info` gauge, which the Gateway API Inference Extension reads from model servers:
    value = now, labels = the slot count and the adapters with running / waiting requests (comma-separated,
    sorted). One series per scrape; each list is bounded to `max_lora` names (running ones are, by the engine's
    slots), and more waiting adapters end the list with OTHER, so a label value is at most `max_lora` + 1 names."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        pool = self.metrics._pool
        family = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on LoRA requests.",
                                   labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
        if pool is not None:
            family.add_metric([str(pool.max_loras), _names(pool.running_names(), pool.max_loras),
                               _names(pool.waiting_names(), pool.max_loras)], time.time())
        yield family


def _names(names: list[str], most: int) -> str:
    return ",".join(names[:most] + ([OTHER] if len(names) > most else []))




class MetricsMiddleware:
    """Counts every HTTP request by route template (e.g. `/v1/adapters/{name}`) and status, timing it until its
    body is fully sent."""

    def __init__(self, app, metrics: Metrics, router: Router):
        self.app, self.metrics, self.router = app, metrics, router

    def route_of(self, scope) -> str:
        """The path template of the route that serves `scope` (as the router picks it: the first full match,
        else the first route whose path matches but not its method, a 405), or OTHER."""
        partial = None
        for route in self.router.routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return getattr(route, "path", OTHER)
            if match is Match.PARTIAL and partial is None:
                partial = route
        return getattr(partial, "path", OTHER)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = self.route_of(scope)
        status = {"code": 500}

        async def send_and_record(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        start = time.perf_counter()
        self.metrics.in_flight.labels(route).inc()
        try:
            await self.app(scope, receive, send_and_record)
        finally:
            self.metrics.in_flight.labels(route).dec()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
            self.metrics.requests.labels(route, str(status["code"])).inc()
