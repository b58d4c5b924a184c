"""Answering a generation over HTTP: awaiting it unless the client leaves, engine errors as API errors, and
server-sent events."""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from steerserve.server.frontend import generation as gen
from steerserve.server.frontend import prompt_methods as prompting

from .errors import APIError, BadRequest, GatewayTimeout, Unavailable

log = logging.getLogger("steerserve.server")


class ClientDisconnected(Exception):
    """The client went away before its answer was ready (the app answers 499, which nobody reads)."""


def prompt_stats(g) -> dict:
    """The response's `steering_stats` (intermediate texts of prompt methods), when asked for and present."""
    stats = g.stats() if isinstance(g, prompting.PromptRun) else None
    return {"steering_stats": stats} if stats else {}


def timed_out(seconds: float) -> GatewayTimeout:
    return GatewayTimeout(f"the request took longer than the server's limit of {seconds:g} s (request_timeout) "
                          "and was aborted", code="request_timeout")


async def until_disconnect(request: Request, work, timeout: float | None = None):
    """Await `work`, cancelling it (which aborts its engine requests) if the client goes away first, or after
    `timeout` seconds (then a 504)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if not watcher.done() or watcher.cancelled():
            raise timed_out(timeout)
        raise ClientDisconnected()
    return _engine_result(task)


def _engine_result(task: asyncio.Future):
    try:
        return task.result()
    except APIError:
        raise
    except Exception as exc:
        raise engine_error(exc) from exc


def engine_error(exc: Exception) -> APIError:
    """vLLM rejects some requests only when they reach the engine; those are the client's errors (400). A dead
    engine is a 503 (`engine_unavailable`): the request was fine, the server is restarting."""
    from vllm.exceptions import VLLMClientError

    from steerserve.server.engine import vllm_compat

    cause = exc.__cause__ or exc
    if isinstance(exc, vllm_compat.engine_dead_error()) or isinstance(cause, vllm_compat.engine_dead_error()):
        return Unavailable("the engine is unavailable: it stopped while serving this request; the server is "
                           "restarting", code="engine_unavailable")
    if isinstance(cause, VLLMClientError | ValueError):
        return BadRequest(str(cause), param=getattr(cause, "parameter", None))
    log.exception("generation failed", exc_info=exc)
    return APIError(f"generation failed: {type(cause).__name__}")


async def sse(request: Request, g: gen.Generation | prompting.PromptRun, preamble: list[dict],
              render: Callable[[gen.Delta], dict], head: dict, req, headers: dict[str, str],
              epilogue: Callable[[], list[dict]] | None = None, timeout: float | None = None) -> Response:
    """Server-sent events. The first delta is awaited before answering, so a request the engine rejects is still
    a 400 and not a broken stream. `epilogue`: events sent after the last delta (called then). Past `timeout`
    seconds the request is aborted: a 504 before the first delta, an in-band error event after it."""
    deltas = g.deltas()
    deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
    try:
        first = await until_disconnect(request, deltas.__anext__(), timeout)
    except StopAsyncIteration:
        first = None
    include_usage = req.stream_options is not None and req.stream_options.include_usage

    async def body() -> AsyncIterator[str]:
        try:
            for chunk in preamble:
                yield f"data: {json.dumps(chunk)}\n\n"
            if first is not None:
                yield f"data: {json.dumps(render(first))}\n\n"
                while True:
                    try:
                        async with asyncio.timeout_at(deadline):
                            d = await deltas.__anext__()
                    except StopAsyncIteration:
                        break
                    except TimeoutError:
                        raise timed_out(timeout) from None
                    yield f"data: {json.dumps(render(d))}\n\n"
            for event in epilogue() if epilogue else []:
                yield f"data: {json.dumps(event)}\n\n"
            if stats := prompt_stats(g):
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': None, **stats})}\n\n"
            if include_usage:
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': g.usage()})}\n\n"
        except Exception as exc:  # the status line is gone; report in-band as OpenAI does
            err = exc if isinstance(exc, APIError) else engine_error(exc)
            yield f"data: {json.dumps(err.body())}\n\n"
        finally:
            await deltas.aclose()
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", **headers})
