"""JSON request bodies, read the way this server always has, but declared on the routes as pydantic models so
/openapi.json describes them.

FastAPI on its own would parse a body only under a JSON content type, answer malformed JSON before the route's
dependencies have authenticated the caller, and report an empty body as a missing field. `JSONRoute` reads the
body first instead: any content type, `json.loads` (so NaN parses and the schema refuses it, naming the field).
A body that is not JSON, or not a JSON object, is kept on the request scope and reported where FastAPI reports
validation errors, i.e. after the route's dependencies: the order of checks stays who the caller is, what they
may touch, then the body (JSON first, then its schema). Every such error is a 400 in OpenAI's shape."""
from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.params import Form
from fastapi.routing import APIRoute
from pydantic import BaseModel

from .errors import BadRequest

BODY_ERROR = "steerserve.body_error"  # scope key: the BadRequest for a body that is not a JSON object


def parse_json(raw: bytes, what: str = "the request body") -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"{what} is not valid JSON: {exc}", code="invalid_json") from None


def json_object(raw: bytes) -> dict[str, Any]:
    body = parse_json(raw)
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
            raw = await request.body()
            try:
                body: dict[str, Any] | None = json_object(raw)
            except BadRequest as exc:
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


def body_error(request: Request) -> BadRequest | None:
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
