"""`X-Request-Id` on every response, and one log line per request that carries it.

A client's own `X-Request-Id` is echoed when it is a usable identifier (1 to 128 visible ASCII characters, no
spaces); otherwise, or when absent, the server makes one (32 hex digits). Either way the same id is in the
response header, in the request's scope (`REQUEST_ID`, for routes that want it) and in the request's log line on
the `steerserve.access` logger: `<client> "<METHOD> <path>" <status> <ms>ms request_id=<id>`, written when the
response has been sent (for a stream: when it ends)."""
from __future__ import annotations

import json
import logging
import re
import time
import uuid

HEADER = "X-Request-Id"
REQUEST_ID = "steerserve.request_id"  # scope key
_USABLE = re.compile(r"[\x21-\x7e]{1,128}")

_INTERNAL = json.dumps({"error": {"message": "internal server error", "type": "server_error", "param": None,
                                  "code": None}}).encode()

log = logging.getLogger("steerserve.access")


def request_id(given: str | None) -> str:
    """The id a request goes by: `given` if usable, else a fresh one."""
    return given if given is not None and _USABLE.fullmatch(given) else uuid.uuid4().hex


class RequestIdMiddleware:
    """ASGI middleware: sets `X-Request-Id` on the response and logs the request's line."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), None)
        rid = scope[REQUEST_ID] = request_id(given)
        status = {"code": 500}

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status["code"], status["sent"] = message["status"], True
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", rid.encode("latin-1"))]}
            await send(message)

        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            if status["code"] == 500 and not status.get("sent"):  # an unhandled error: still a 500 with the id
                await send_with_id({"type": "http.response.start", "status": 500,
                                    "headers": [(b"content-type", b"application/json")]})
                await send_with_id({"type": "http.response.body", "body": _INTERNAL})
            raise
        finally:
            client = scope.get("client")
            query = f"?{scope['query_string'].decode('latin-1')}" if scope.get("query_string") else ""
            log.info('%s "%s %s%s" %d %.1fms request_id=%s', f"{client[0]}:{client[1]}" if client else "-",
                     scope["method"], scope["path"], query, status["code"], (time.perf_counter() - start) * 1e3, rid)
