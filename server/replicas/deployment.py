"""The Ray Serve application: N engine replicas, each serving the same FastAPI app as the single process, behind
one small router that Ray Serve's HTTP proxy sends every request to.

    client -> Ray Serve HTTP proxy -> Router -> (handle, multiplexed by adapter) -> EngineReplica x N -> its engine

- `EngineReplica`: one engine, the app built exactly as `steerserve serve` builds it (server/cli/serve.py:
  `build_app`), its lifespan (the engine build, its watcher) run by the replica. It answers the router's
  `forward` calls by driving the app over ASGI (server/replicas/forwarding.py), streaming the answer back. (Not
  `@serve.ingress(app)`: the proxy cannot read a body, and the adapter a request names is in its body.) The
  (async) constructor returns only once the engine is ready, so Ray Serve sends a replica traffic only after
  that; `check_health` fails once the engine failed or died, and Ray Serve then replaces the replica.
- `Router`: reads a request whole, keys it by the adapter it names (forwarding.affinity_key) and calls a replica
  through Ray Serve's model multiplexing with that key, so requests for one adapter go to the replicas that
  already hold it; requests without an adapter use Ray Serve's default routing (the less loaded of two random
  replicas). A replica that dies with the request on it is a 503 in OpenAI's shape (`replica_unavailable`),
  or, mid-stream, a final SSE `error` event: never a hang. `/metrics` is every replica's page, labelled by
  replica (server/replicas/metrics_merge.py), from the `ReplicaBoard` each replica reports to.
- `ReplicaBoard`: a named Ray actor holding each replica's latest report (pid, readiness, metrics page).

State shared by the replicas is what the stores share: the data directory (SQLite, adapter and vector files) on
one machine; per replica: the engine, its KV cache (`kv_cache_gib` each), its loaded adapters, its admission
bounds and its metrics."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path

import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from ..settings import Settings
from .forwarding import ForwardedRequest, ResponseStart, affinity_key, run_asgi
from .metrics_merge import merge_replica_metrics

log = logging.getLogger("steerserve.replicas")
NAMESPACE = "steerserve"
BOARD = "steerserve-replica-board"
REPORT_EVERY_S = 2.0  # how often a replica reports to the board
REPORT_FRESH_S = 15.0  # a report older than this is a replica that is gone
REPLICA_HEADER = b"x-steerserve-replica"
ENGINE_READY_TIMEOUT_S = 900.0  # a replica whose engine is not ready by then fails its start (Ray retries it)
# Environment variables a replica inherits from the process that starts the application (engine and thread
# settings; the rest of a replica's configuration travels in its Settings).
INHERITED_ENV_PREFIXES = ("VLLM_", "STEERSERVE_", "HF_", "TRANSFORMERS_")


@ray.remote(num_cpus=0)
class ReplicaBoard:
    """Each replica's latest report: {"pid", "ready", "metrics", "at"}."""

    def __init__(self) -> None:
        self.reports: dict[str, dict] = {}

    def put(self, replica: str, report: dict) -> None:
        self.reports[replica] = {**report, "at": time.time()}

    def fresh(self, max_age_s: float = REPORT_FRESH_S) -> dict[str, dict]:
        now = time.time()
        self.reports = {r: v for r, v in self.reports.items() if now - v["at"] <= 4 * max_age_s}
        return {r: v for r, v in self.reports.items() if now - v["at"] <= max_age_s}


def board():
    """The board actor, created by whoever asks first (launcher, config-file builder or replica)."""
    return ReplicaBoard.options(name=BOARD, namespace=NAMESPACE, get_if_exists=True, lifetime="detached").remote()


class EngineReplica:
    async def __init__(self, settings_json: str):  # Ray Serve awaits an async constructor
        from ..cli.app_from_settings import build_app
        from ..frontend.tool_calls import chat_template
        from ..http.auth import KeyStore

        settings = Settings.model_validate_json(settings_json)
        self.replica = serve.get_replica_context().replica_id.unique_id
        keys = KeyStore.load(settings.api_keys) if settings.api_keys else KeyStore.open()
        template = chat_template(settings.chat_template) if settings.chat_template else None
        self.failed, self.reporter, self.lifespan = False, None, None
        self.app = build_app(settings, Path(settings.model), keys, template, self._engine_failed)
        self.state = self.app.state.steerserve
        self.board = board()
        self.lifespan = self.app.router.lifespan_context(self.app)
        await self.lifespan.__aenter__()  # builds the engine in the background, as the single server does
        self.reporter = asyncio.ensure_future(self._report_forever())
        deadline = time.monotonic() + ENGINE_READY_TIMEOUT_S
        while self.state.engine is None and not self.failed and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        if self.state.engine is None:
            raise RuntimeError(f"replica {self.replica}: the engine did not start: {self.state.error}")
        log.info("replica %s (pid %d): engine ready", self.replica, os.getpid())

    def _engine_failed(self) -> None:
        self.failed = True

    async def _report_forever(self) -> None:
        while True:
            try:
                await self.board.put.remote(self.replica, self._report())
            except Exception:  # noqa: BLE001 - the board is a convenience: serving goes on without it
                log.warning("replica %s: could not report to the board", self.replica, exc_info=True)
            await asyncio.sleep(REPORT_EVERY_S)

    def _report(self) -> dict:
        ready = self.state.engine is not None and self.state.dead is None and not self.failed
        return {"pid": os.getpid(), "ready": ready, "metrics": self.state.metrics.render().decode()}

    async def check_health(self) -> None:
        """Ray Serve calls this every few seconds; raising makes it replace the replica."""
        if self.failed or self.state.dead is not None:
            raise RuntimeError(f"replica {self.replica}: the engine is unavailable: {self.state.dead}")

    async def __del__(self) -> None:  # Ray Serve awaits it when it stops the replica
        if getattr(self, "reporter", None) is not None:
            self.reporter.cancel()
        if getattr(self, "lifespan", None) is not None:
            await self.lifespan.__aexit__(None, None, None)  # shuts the engine down

    async def resident(self, key: str) -> str:
        """Marks an adapter key as held by this replica (Ray Serve routes the key's next requests here); the
        adapter itself is loaded by the app's adapter pool. Made a `serve.multiplexed` LRU as large as the
        pool's (--max-cpu-loras) by `engine_replica_class`."""
        return key

    async def forward(self, request: ForwardedRequest):
        if key := serve.get_multiplexed_model_id():
            await self.resident(key)
        async for item in run_asgi(self.app, request):
            if isinstance(item, ResponseStart):
                item = ResponseStart(item.status, [*item.headers, (REPLICA_HEADER, self.replica.encode())])
            yield item


def engine_replica_class(capacity: int) -> type:
    """EngineReplica whose multiplexed record holds `capacity` adapter keys, as many as its adapter pool keeps
    loaded, so Ray Serve's idea of what a replica holds is the pool's."""
    class SteerServeEngineReplica(EngineReplica):
        @serve.multiplexed(max_num_models_per_replica=capacity)
        async def resident(self, key: str) -> str:
            return key

    return SteerServeEngineReplica


def _error(status: int, message: str, code: str) -> Response:
    body = {"error": {"message": message, "type": "service_unavailable" if status == 503 else "api_error",
                      "param": None, "code": code}}
    return Response(json.dumps(body), status_code=status, media_type="application/json",
                    headers={"Retry-After": "1"} if status == 503 else None)


class Router:
    def __init__(self, engine, settings_json: str, affinity: bool = True):
        """`affinity` False routes every request by Ray Serve's default policy (the affinity benchmark's
        baseline)."""
        from ..http.auth import KeyStore

        settings = Settings.model_validate_json(settings_json)
        self.engine, self.affinity = engine, affinity
        self.keys = KeyStore.load(settings.api_keys) if settings.api_keys else KeyStore.open()
        self.board = board()

    def tenant_of(self, authorization: str | None) -> str | None:
        try:
            return self.keys.authenticate(authorization).tenant
        except Exception:  # noqa: BLE001 - a bad key: the replica answers 401 itself
            return None

    async def __call__(self, request: Request) -> Response:
        forwarded = ForwardedRequest(request.method, request.url.path, request.url.query.encode(),
                                     list(request.headers.raw), await request.body(),
                                     (request.client.host, request.client.port) if request.client else None)
        key = affinity_key(forwarded, self.tenant_of) if self.affinity else ""
        stream = self.engine.options(stream=True, multiplexed_model_id=key).forward.remote(forwarded)
        try:
            start = await stream.__anext__()
        except Exception as exc:  # noqa: BLE001 - the replica died or could not be reached
            stream.cancel()
            log.warning("request to a replica failed before it answered: %r", exc)
            return _error(503, f"the replica serving this request failed ({type(exc).__name__}); retry",
                          "replica_unavailable")
        assert isinstance(start, ResponseStart)
        if forwarded.method == "GET" and forwarded.path == "/metrics" and start.status == 200:
            return await self._metrics(stream, start)
        event_stream = any(k == b"content-type" and v.startswith(b"text/event-stream") for k, v in start.headers)

        async def body():
            try:
                async for chunk in stream:
                    yield chunk
            except Exception as exc:  # noqa: BLE001 - the replica died mid-answer: end the stream clearly
                log.warning("a replica failed mid-response: %r", exc)
                if event_stream:
                    err = {"error": {"message": f"the replica serving this request failed ({type(exc).__name__})",
                                     "type": "service_unavailable", "param": None, "code": "replica_unavailable"}}
                    yield f"data: {json.dumps(err)}\n\n".encode()
            finally:
                stream.cancel()

        response = StreamingResponse(body(), status_code=start.status)
        response.raw_headers = [(k, v) for k, v in start.headers]
        return response

    async def _metrics(self, stream, start: ResponseStart) -> Response:
        page = b"".join([chunk async for chunk in stream]).decode()
        replica = dict(start.headers).get(REPLICA_HEADER, b"").decode()
        pages = {r: v["metrics"] for r, v in (await self.board.fresh.remote()).items()}
        pages[replica] = page  # the one that just answered, fresher than its report
        return Response(merge_replica_metrics(pages), media_type="text/plain; version=0.0.4")


def replica_env(settings: Settings, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of each replica: this process's engine settings, and its thread count from replica_cpus."""
    environ = os.environ if environ is None else environ
    env = {k: v for k, v in environ.items() if k.startswith(INHERITED_ENV_PREFIXES)}
    env["OMP_NUM_THREADS"] = str(max(1, int(settings.replica_cpus)))
    env.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    return env


def build_application(settings: Settings):
    """The Ray Serve application for `settings` (settings.model must be a checkpoint directory every node can
    read, settings.replicas the number of engine replicas)."""
    settings_json = settings.model_dump_json()
    pool_size = settings.max_cpu_loras or 4 * settings.max_loras  # adapters the pool keeps loaded
    engine = serve.deployment(engine_replica_class(pool_size)).options(
        name="SteerServeReplica", num_replicas=settings.replicas or 1,
        ray_actor_options={"num_cpus": settings.replica_cpus, "runtime_env": {"env_vars": replica_env(settings)}},
        # The app's own admission answers 429 beyond its bounds; Ray Serve must not queue in front of it.
        max_ongoing_requests=settings.max_queued_requests + 64, health_check_period_s=2.0,
        health_check_timeout_s=30.0, graceful_shutdown_timeout_s=settings.shutdown_timeout)
    router = serve.deployment(Router).options(
        name="SteerServeRouter", num_replicas=1, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=(settings.replicas or 1) * (settings.max_queued_requests + 64))
    return router.bind(engine.bind(settings_json), settings_json)


def app_builder(args: dict):
    """For Ray Serve config files (`import_path: steerserve.server.replicas.deployment:app_builder`): `args` are
    steerserve settings by name (as in `steerserve serve --config`); `replicas` defaults to 1. The model is
    resolved and the keys and bind address checked as `steerserve serve` checks them."""
    from .replica_settings import prepare

    return build_application(prepare(Settings(**{"replicas": 1, **args})))
