"""Bounded input: every limit on what one request may send, and where each is enforced.

Each limit is a setting (server/settings.py, same name; docs/security.md lists them with their defaults and the
status each gives). The transport-level ones are checked by `RequestGuard`, an ASGI middleware in front of every
route, before a byte of the body is parsed:
- headers larger than `max_header_bytes` in all: 431;
- in open mode (no API keys), a `Host` that is not a loopback name or address: 421 (DNS rebinding: a web page
  whose name resolves to 127.0.0.1 would otherwise reach an admin API);
- a body longer than `max_request_bytes` (`max_upload_bytes` for a multipart or octet-stream upload to
  `PUT /v1/adapters/{name}` or `PUT /v1/steering/vectors/{name}`, which also hold uploads to their own bounds): 413, from
  `Content-Length` at once, or counted while the body streams in (chunked), so nothing larger is ever buffered.
JSON-level limits (depth, integer digits, lone surrogates) are checked where bodies are parsed (body.py), and
the request-level ones (messages, prompts, stop strings, logit_bias, steering size) by `check_generation`
before any tokenization. Every refusal is OpenAI's error object naming the param."""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

from .auth import is_loopback
from .errors import APIError, BadRequest, HeadersTooLarge, Misdirected, PayloadTooLarge

UPLOAD_TYPES = ("multipart/form-data", "application/octet-stream")
UPLOAD_PATHS = ("/v1/adapters/", "/v1/steering/vectors/")  # routes that take uploads (PUT): --max-upload-bytes


@dataclass(frozen=True)
class InputLimits:
    """The limits one request is held to; the defaults are the settings' defaults."""

    max_request_bytes: int = 8 * 2**20
    max_upload_bytes: int = 2**30
    max_header_bytes: int = 32 * 2**10
    max_json_depth: int = 64
    max_json_int_digits: int = 64
    max_messages: int = 2048
    max_prompt_chars: int = 1_000_000
    max_prompts: int = 256
    max_stop_chars: int = 1024
    max_logit_bias: int = 300
    max_steering_bytes: int = 2**20  # room for inline control vectors (up to 65,536 values)

    @classmethod
    def from_settings(cls, settings: Any) -> InputLimits:
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})


def media_type(headers: dict[str, str] | Any) -> str:
    """The request's media type, lower-case, without parameters ("" when there is no Content-Type)."""
    return (headers.get("content-type") or "").split(";", 1)[0].strip().lower()


# --- the transport: headers, Host, body size ------------------------------------------------------------------

class RequestGuard:
    """ASGI middleware: the header, Host and body-size checks above, answered in OpenAI's error shape."""

    def __init__(self, app, limits: InputLimits, open_mode: bool):
        self.app, self.limits, self.open_mode = app, limits, open_mode

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            limit, flag = self._check(scope)
        except APIError as err:
            return await send_error(send, err)
        seen = 0

        async def bounded_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # raised inside the route's body read; the app's APIError handler answers
                    raise too_large(limit, flag)
            return message

        await self.app(scope, bounded_receive, send)

    def _check(self, scope) -> tuple[int, str]:
        """The request's body limit and its flag, after the header and Host checks (an APIError if one fails)."""
        raw = scope["headers"]
        size = sum(len(k) + len(v) + 4 for k, v in raw)  # "name: value\r\n", as on the wire
        if size > self.limits.max_header_bytes:
            largest = max(raw, key=lambda kv: len(kv[0]) + len(kv[1]))[0].decode("latin-1")
            raise HeadersTooLarge(f"the request headers are {size} bytes; at most {self.limits.max_header_bytes} "
                                  f"(--max-header-bytes) are accepted (the largest is {largest!r})", param=largest,
                                  code="request_header_fields_too_large")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw}
        if self.open_mode and "host" in headers and not is_loopback(_host_name(headers["host"])):
            raise Misdirected(f"this server runs without API keys and answers only to loopback names "
                              f"(localhost, 127.0.0.1, [::1]), not Host {headers['host'][:100]!r}", param="Host",
                              code="misdirected_request")
        upload = media_type(headers) in UPLOAD_TYPES and scope["method"] == "PUT" and \
            scope["path"].startswith(UPLOAD_PATHS)
        limit = self.limits.max_upload_bytes if upload else self.limits.max_request_bytes
        flag = "--max-upload-bytes" if upload else "--max-request-bytes"
        length = headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                raise BadRequest(f"Content-Length must be a number of bytes, got {length[:40]!r}",
                                 param="Content-Length", code="invalid_value")
            if int(length) > limit:
                raise too_large(limit, flag)
        return limit, flag


def too_large(limit: int, flag: str) -> PayloadTooLarge:
    return PayloadTooLarge(f"the request body is larger than {limit} bytes ({flag})", param="body",
                           code="request_too_large")


def _host_name(host: str) -> str:
    """The name in a Host header without its port ("[::1]:8000" -> "::1", "localhost:80" -> "localhost")."""
    host = host.strip()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


async def send_error(send, err: APIError) -> None:
    body = json.dumps(err.body()).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


# --- one generation request -------------------------------------------------------------------------------------

def check_generation(req: Any, limits: InputLimits) -> None:
    """The request-level limits of a validated chat or completion request; BadRequest naming the param.
    Checked before any tokenization, so an oversized request costs the server next to nothing."""
    messages = getattr(req, "messages", None)
    if messages is not None:
        _array(len(messages), limits.max_messages, "messages", "--max-messages")
        chars = sum(len(m.text()) for m in messages)
        _chars(chars, limits.max_prompt_chars, "messages", "total characters of the messages")
    else:
        prompts = req.prompts()
        _array(len(prompts) * req.n, limits.max_prompts, "prompt", "--max-prompts",
               f" ({len(prompts)} prompts x n={req.n}: each prompt is n engine requests)" if req.n > 1 else "")
        chars = sum(len(p) for p in prompts)  # characters, or token ids
        _chars(chars, limits.max_prompt_chars, "prompt", "total length of the prompts")
    for i, stop in enumerate(req.stop or []):
        if len(stop) > limits.max_stop_chars:
            raise BadRequest(f"Invalid 'stop[{i}]': string too long. Expected a string with maximum length "
                             f"{limits.max_stop_chars} (--max-stop-chars), but got a string with length {len(stop)} "
                             "instead.", param="stop", code="string_above_max_length")
    if req.logit_bias is not None and len(req.logit_bias) > limits.max_logit_bias:
        raise BadRequest(f"Invalid 'logit_bias': at most {limits.max_logit_bias} entries (--max-logit-bias), got "
                         f"{len(req.logit_bias)}.", param="logit_bias", code="object_above_max_size")
    if req.steering is not None:
        size = len(json.dumps(req.steering, separators=(",", ":")))
        if size > limits.max_steering_bytes:
            raise BadRequest(f"Invalid 'steering': the spec is {size} bytes of JSON; at most "
                             f"{limits.max_steering_bytes} (--max-steering-bytes; store a larger one as a profile)",
                             param="steering", code="object_above_max_size")


def _array(length: int, limit: int, param: str, flag: str, why: str = "") -> None:
    if length > limit:
        raise BadRequest(f"Invalid '{param}': array too long. Expected an array with maximum length {limit} "
                         f"({flag}), but got an array with length {length} instead{why}.", param=param,
                         code="array_above_max_length")


def _chars(length: int, limit: int, param: str, what: str) -> None:
    if length > limit:
        raise BadRequest(f"Invalid '{param}': the {what} is {length}; at most {limit} (--max-prompt-chars).",
                         param=param, code="string_above_max_length")
