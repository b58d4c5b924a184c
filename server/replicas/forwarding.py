"""One HTTP request carried from the router to a replica and back, without Ray: the request as plain data, the
replica side driving the FastAPI app over ASGI, and the adapter-affinity key the router routes by.

Ray Serve's handles carry picklable values, not sockets, so the router (server/replicas/deployment.py) reads the
request whole into a `ForwardedRequest`, and the replica's `run_asgi` yields the app's answer as a `ResponseStart`
followed by body chunks, streamed back through the handle as they come (SSE stays a stream). When the router
stops reading (its client went away, or it gave up), closing the generator tells the app `http.disconnect`, which
aborts the engine request, exactly as a client disconnect does on the single server."""
from __future__ import annotations

import asyncio
import gc
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

# Routes whose JSON body names a model, hence maybe an adapter (`"model": "<base>:<adapter>"`).
MODEL_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/responses"})
AFFINITY_BODY_LIMIT = 8 * 2**20  # bodies larger than this are not parsed by the router (the replica answers 413)
QUEUED_MESSAGES = 64  # response messages the app may be ahead of the reader
CANCEL_GRACE_S = 5.0  # after the reader went away: how long the app may take to abort before it is cancelled


@dataclass(frozen=True)
class ForwardedRequest:
    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]  # as received, lower-case names
    body: bytes
    client: tuple[str, int] | None = None

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)


@dataclass(frozen=True)
class ResponseStart:
    status: int
    headers: list[tuple[bytes, bytes]]


def affinity_key(request: ForwardedRequest, tenant_of: Callable[[str | None], str | None]) -> str:
    """The multiplexed model id a request is routed by: `<tenant>/<adapter model name>` for a generation request
    naming an adapter (`"model": "<base>:<adapter>"`), else "" (no affinity: Ray Serve's default routing).

    An adapter registration is per tenant (a global one is seen by every tenant), so the tenant is part of the key:
    two tenants' adapters of the same name are different registrations. `tenant_of(authorization header)` resolves
    the bearer key (None for a bad key: the replica will answer 401, so no affinity is needed). A body that is not
    a JSON object, or too large, gets "" too: the replica rejects it with the same error the single server gives."""
    if request.method != "POST" or request.path not in MODEL_ROUTES or len(request.body) > AFFINITY_BODY_LIMIT:
        return ""
    try:
        model = json.loads(request.body).get("model")
    except (ValueError, AttributeError):  # not JSON, or JSON but not an object
        return ""
    if not isinstance(model, str) or ":" not in model:
        return ""
    auth = request.header(b"authorization")
    tenant = tenant_of(auth.decode("latin-1") if auth is not None else None)
    if tenant is None:
        return ""
    # Ray Serve compares ids as strings; a digest keeps them short and free of characters a header cannot carry.
    return "adapter-" + hashlib.sha256(f"{tenant}/{model}".encode()).hexdigest()[:24]


async def run_asgi(app: Callable[..., Awaitable[None]], request: ForwardedRequest,
                   server: tuple[str, int] = ("127.0.0.1", 0)) -> AsyncIterator[ResponseStart | bytes]:
    """Run one HTTP request through the ASGI `app`: yields a `ResponseStart`, then each non-empty body chunk.

    Contract: exactly one `ResponseStart` comes first if the app answers at all; an app that fails before
    answering raises its exception here. Closing the generator early (the reader is gone) sends the app
    `http.disconnect` and waits up to CANCEL_GRACE_S for it to finish before cancelling it."""
    messages: asyncio.Queue = asyncio.Queue(QUEUED_MESSAGES)  # bounded: a slow reader slows the app, as a socket does
    gone = asyncio.Event()
    body_sent = False

    async def receive() -> dict:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if not gone.is_set():
            await messages.put(message)
        else:  # the reader left: dropped, as uvicorn drops sends to a closed socket, letting the app see it
            await asyncio.sleep(0)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": request.method, "scheme": "http", "path": request.path, "raw_path": request.path.encode(),
             "query_string": request.query, "root_path": "", "headers": list(request.headers),
             "client": request.client, "server": server}
    task = asyncio.ensure_future(app(scope, receive, send))
    # The end marker, from a task of its own (the queue may be full); None is also what a drained queue gives.
    task.add_done_callback(lambda _: asyncio.ensure_future(messages.put(None)))
    finished = False
    try:
        while (message := await messages.get()) is not None:
            if message["type"] == "http.response.start":
                yield ResponseStart(message["status"], [(bytes(k), bytes(v)) for k, v in message.get("headers", [])])
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body", False):
                    finished = True
                    break
        if not finished and task.done() and task.exception() is not None:
            raise task.exception()
    finally:
        gone.set()  # the app's next receive() is http.disconnect; its next body send() raises
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CANCEL_GRACE_S
        while not task.done() and loop.time() < deadline:
            while not messages.empty():  # unblock a send() waiting on the full queue
                messages.get_nowait()
            await asyncio.sleep(0.01)
        task.cancel()
        if not finished:
            # Starlette leaves the cancelled response's body generator in a reference cycle, so the engine
            # stream inside it is closed (aborting the engine request) only when the cycle is collected: now.
            await asyncio.sleep(0)
            gc.collect(0)
