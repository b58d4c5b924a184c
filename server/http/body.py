"""JSON request bodies, read the way this server always has, but declared on the routes as pydantic models so
/openapi.json describes them.

FastAPI on its own would answer malformed JSON before the route's dependencies have authenticated the caller,
and report an empty body as a missing field. `JSONRoute` reads the body first instead: `Content-Type:
application/json` required (any other is a 415, so a web page's "simple" cross-site request, which can only send
text/plain, form or multipart bodies, never reaches the API), then `parse_json` (so NaN parses and the schema
refuses it, naming the field). A body that is not JSON, or not a JSON object, is kept on the request scope and
reported where FastAPI reports validation errors, i.e. after the route's dependencies: the order of checks stays
who the caller is, what they may touch, then the body (media type, JSON, then its schema). Every such error is
OpenAI's error object.

`parse_json` bounds what `json.loads` alone does not: nesting depth (json's recursion otherwise ends in a
RecursionError), integers of more digits than any field takes (Python refuses past 4,300 digits with a
ValueError, and a 4,000-digit one would be converted at quadratic cost), and lone UTF-16 surrogates such as
"\ud800" (valid JSON, but no text a tokenizer can encode). Each is a 400 naming where in the body it is.
Bodies above 64 KiB are parsed in a worker thread, so a large one never holds up the event loop."""
from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.params import Form
from fastapi.routing import APIRoute
from pydantic import BaseModel

from .errors import APIError, BadRequest, UnsupportedMediaType
from .limits import InputLimits, media_type

BODY_ERROR = "steerserve.body_error"  # scope key: the APIError for a body that is not a JSON object
OFF_LOOP_BYTES = 64 * 2**10
_SURROGATE = re.compile("[\ud800-\udfff]")


class _LongInt(str):
    """An integer literal with more digits than allowed, kept as text until its place in the body is known."""


def parse_json(raw: bytes | str, what: str = "the request body", limits: InputLimits | None = None,
               param: str | None = None) -> Any:
    """`raw` as JSON within `limits` (the defaults if None); BadRequest naming the place (`param` + path)."""
    limits = limits or InputLimits()
    try:
        try:
            value = json.loads(raw)  # integers in C; one too long to convert is found again below, with its place
        except ValueError as exc:
            if isinstance(exc, json.JSONDecodeError | UnicodeDecodeError):
                raise
            value = json.loads(raw, parse_int=lambda text: _LongInt(text) if len(text) > 4000 else int(text))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"{what} is not valid JSON: {exc}", param=param, code="invalid_json") from None
    except RecursionError:
        raise BadRequest(f"{what} is nested more than {limits.max_json_depth} levels deep (--max-json-depth)",
                         param=param, code="invalid_json") from None
    _check_values(value, what, limits, param)
    return value


def _check_values(value: Any, what: str, limits: InputLimits, param: str | None) -> None:
    """Depth, long integers and lone surrogates, found iteratively (no recursion on hostile input). Plain
    numbers, booleans and nulls are never visited one by one, so a long list of token ids costs little."""
    bound = 10 ** limits.max_json_int_digits
    stack: list[tuple[Any, tuple[str, ...], int]] = [(value, (), 0)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, dict | list) and depth >= limits.max_json_depth:
            where = _where(param, path)
            raise BadRequest(f"{what} is nested more than {limits.max_json_depth} levels deep (--max-json-depth)"
                             + (f" at {where}" if where else ""), param=where, code="invalid_json")
        if isinstance(item, _LongInt) or (type(item) is int and not -bound < item < bound):
            where = _where(param, path)
            digits = len(item.lstrip("-")) if isinstance(item, _LongInt) else len(str(abs(item)))
            raise BadRequest(f"{where or what}: an integer of {digits} digits; at most "
                             f"{limits.max_json_int_digits} are accepted", param=where, code="invalid_value")
        if isinstance(item, str) and _SURROGATE.search(item):
            where = _where(param, path)
            raise BadRequest(f"{where or what}: contains a lone UTF-16 surrogate (e.g. \\ud800), which is not "
                             "text", param=where, code="invalid_value")
        if isinstance(item, dict):
            for key, sub in item.items():
                if _SURROGATE.search(key):
                    where = _where(param, path)
                    raise BadRequest(f"{where or what}: a key contains a lone UTF-16 surrogate", param=where,
                                     code="invalid_value")
                if type(sub) not in _PLAIN or (type(sub) is int and not -bound < sub < bound):
                    stack.append((sub, (*path, key), depth + 1))
        elif isinstance(item, list):
            stack.extend((sub, (*path, str(i)), depth + 1) for i, sub in enumerate(item)
                         if type(sub) not in _PLAIN or (type(sub) is int and not -bound < sub < bound))


_PLAIN = frozenset({int, float, bool, type(None)})  # scalars: only an int's size is checked (a _LongInt is a str)


def _where(param: str | None, path: tuple[str, ...]) -> str | None:
    return ".".join(((param,) if param else ()) + path) or None


async def read_json(raw: bytes, what: str = "the request body", limits: InputLimits | None = None) -> Any:
    """`parse_json`, in a worker thread when the body is large."""
    if len(raw) > OFF_LOOP_BYTES:
        return await asyncio.to_thread(parse_json, raw, what, limits)
    return parse_json(raw, what, limits)


def require_media_type(request: Request, *allowed: str) -> None:
    """UnsupportedMediaType (415) unless the request's Content-Type is one of `allowed`."""
    kind = media_type(request.headers)
    if kind not in allowed:
        raise UnsupportedMediaType(f"Content-Type {kind or '(none)'!r} is not accepted here; send "
                                   f"{' or '.join(a for a in allowed if a)}", param="Content-Type",
                                   code="unsupported_media_type")


def request_limits(request: Request) -> InputLimits:
    state = getattr(request.app.state, "steerserve", None)
    return getattr(state, "input_limits", None) or InputLimits()


async def json_object(raw: bytes, limits: InputLimits) -> dict[str, Any]:
    body = await read_json(raw, limits=limits)
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object", code="invalid_json")
    return body


class JSONRoute(APIRoute):
    """A route whose declared (non-form) body is read by `json_object` before FastAPI validates it."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None or isinstance(self.body_field.field_info, Form):
            return handler

        async def read_json_first(request: Request) -> Response:
            raw = b""
            try:
                require_media_type(request, "application/json")  # before reading: a 415 reads nothing
                raw = await request.body()
                body: dict[str, Any] | None = await json_object(raw, request_limits(request))
            except APIError as exc:
                request.scope[BODY_ERROR] = exc  # FastAPI sees no body; the error handler reports this instead
                body = None
            return await handler(_parsed(request, raw, body))

        return read_json_first


def _parsed(request: Request, raw: bytes, body: dict[str, Any] | None) -> Request:
    """The request as FastAPI's handler must see it to take `body` as the parsed JSON: a JSON content type (on a
    copy of the scope; the route's own headers are otherwise unchanged) and the body already read."""
    headers = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"]
    scope = {**request.scope, "headers": [*headers, (b"content-type", b"application/json")]}
    parsed = Request(scope, request.receive, request._send)
    parsed._body, parsed._json = raw, body
    return parsed


def body_error(request: Request) -> APIError | None:
    """The error of a body `JSONRoute` could not read as a JSON object, if any."""
    return request.scope.get(BODY_ERROR)


def described(content: dict[str, Any], description: str) -> dict[str, Any]:
    """`openapi_extra` for a route that reads its body itself: the body's media types and schemas."""
    return {"requestBody": {"required": True, "description": description, "content": content}}


def model_ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def publish_schemas(app: FastAPI, *models: type[BaseModel]) -> None:
    """Add `models` (and the models they use) to /openapi.json's components, for bodies routes read themselves
    and describe with `model_ref`."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)  # sets app.openapi_schema, completed here
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                spec = model.model_json_schema(ref_template="#/components/schemas/{model}")
                for name, sub in {**spec.pop("$defs", {}), model.__name__: spec}.items():
                    if components.setdefault(name, sub) != sub:
                        raise RuntimeError(f"two request body schemas are named {name!r}")
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
